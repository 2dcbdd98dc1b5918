//! The decode graph: a single-token step is captured once, when the session is made, into a
//! CUDA graph and replayed for every step (launch overhead off the critical path). A capture
//! that fails falls back to plain launches silently in effect (one line on stderr), which once
//! cost ~10 % of decode speed unnoticed: this test asserts that the capture succeeds on a model
//! with every layer kind (sliding, CSA with its indexer branch, HCA), that a prefill keeps
//! the graph (it reallocates none of the buffers the graph holds), and that the replayed steps
//! give logits bit-identical to the same steps launched one kernel at a time. The replayed steps go through
//! `Session::decode_step` (the bench's and the CLI's path), the launched ones through `eval`.
//!
//! Without a GPU: "skipped: no CUDA".

mod common;

use std::path::PathBuf;

use common::argmax;
use ds4_cuda::CudaBackend;
use ds4_model::backend::{Logits, Session};
use ds4_model::convert::{convert, ConvertOptions};
use ds4_model::greedy::argmax_excluding;
use ds4_model::layout::WeightsMode;
use ds4_model::npy;
use ds4_model::numerics::Numerics;

/// Decode steps after the prefill (every one replays the graph captured with the session).
const STEPS: usize = 12;

fn fixture_dir() -> PathBuf {
    let here = PathBuf::from("tests/fixtures/models/ratios_real");
    if here.is_dir() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/ratios_real")
}

/// The ratios_real fixture (every layer kind) converted to ds4-q2 and loaded on the GPU with
/// ds4 numerics, and its prompt.
fn fixture_backend(tag: &str) -> (CudaBackend, Vec<u32>) {
    let dir = std::env::temp_dir().join(format!("ds4-cuda-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ratios_real-ds4-q2.gguf");
    convert(
        &fixture_dir(),
        &path,
        &ConvertOptions::new(WeightsMode::Ds4Q2),
    )
    .unwrap();
    let tokens = npy::read(&std::fs::read(fixture_dir().join("tokens.npy")).unwrap()).unwrap();
    let prompt: Vec<u32> = tokens.data.iter().map(|&v| v as u32).collect();
    let backend = CudaBackend::load(&path, Numerics::Ds4, 0).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (backend, prompt)
}

/// Prefill of the fixture's prompt, then STEPS greedy steps; the logits of every step, and
/// whether a graph was captured before the first step and after the last.
fn decode(backend: &CudaBackend, prompt: &[u32], graphs: bool) -> (Vec<Vec<f32>>, [bool; 2]) {
    let mut s = backend.session(prompt.len() + STEPS + 1).unwrap();
    s.set_decode_graphs(graphs);
    let mut logits = s.eval(prompt, Logits::Last).unwrap();
    let before = s.decode_graph_captured();
    let mut steps = Vec::new();
    for _ in 0..STEPS {
        let token = argmax(&logits);
        logits = if graphs {
            s.decode_step(token).unwrap().to_vec()
        } else {
            s.eval(&[token], Logits::Last).unwrap()
        };
        assert_eq!(s.last_logits(), &logits[..]);
        steps.push(logits.clone());
    }
    (steps, [before, s.decode_graph_captured()])
}

#[test]
fn decode_steps_replay_a_captured_graph_with_identical_logits() {
    if !ds4_cuda::cuda_available() {
        println!("skipped: no CUDA");
        return;
    }
    let (backend, prompt) = fixture_backend("graph");
    let (replayed, captured) = decode(&backend, &prompt, true);
    let (launched, _) = decode(&backend, &prompt, false);
    // Captured with the session, so the first reply token pays no capture, and still valid
    // after a prefill (which reallocated none of the buffers it holds).
    assert!(
        captured[0],
        "no decode graph after the prefill: the session did not capture one, or the prefill \
         reallocated a buffer it held"
    );
    assert!(captured[1], "the decode step was not captured into a graph");
    for (i, (a, b)) in replayed.iter().zip(&launched).enumerate() {
        let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "step {i}: graph-replayed logits differ from launched ones"
        );
    }
}

/// Greedy steps pick on the GPU (`Session::decode_greedy`: the pick ends the graph, and the
/// next step finds its token and position on the device). Their picks must be the host's
/// `argmax_excluding` of the same logits, and the logits, downloaded only when asked for,
/// bit-identical to `decode_step`'s: with and without graphs, with excluded ids that change
/// between steps (including the best one), a list too long for the GPU (picked on the host),
/// and a plain `decode_step` in the middle (after which the token must be uploaded again).
#[test]
fn greedy_steps_pick_on_the_gpu_what_the_host_picks() {
    if !ds4_cuda::cuda_available() {
        println!("skipped: no CUDA");
        return;
    }
    let (backend, prompt) = fixture_backend("greedy");
    let steps = 16;
    for graphs in [true, false] {
        let mut greedy = backend.session(prompt.len() + steps + 1).unwrap();
        let mut plain = backend.session(prompt.len() + steps + 1).unwrap();
        greedy.set_decode_graphs(graphs);
        let first = greedy.eval(&prompt, Logits::Last).unwrap();
        plain.eval(&prompt, Logits::Last).unwrap();
        let mut token = argmax(&first);
        for i in 0..steps {
            let want = plain.decode_step(token).unwrap().to_vec();
            // Nothing, the host's best id (so the second best wins), ids around it, a
            // list longer than the GPU takes (GREEDY_MAX_EXCLUDE).
            let best = argmax(&want);
            let exclude: Vec<u32> = match i % 4 {
                0 => vec![],
                1 => vec![best],
                2 => vec![best.saturating_sub(1), best, best + 1],
                _ => (0..40).map(|k| (best + k) % want.len() as u32).collect(),
            };
            let picked = if i == 9 {
                // A plain step in between: the next greedy step uploads its token again.
                argmax_excluding(greedy.decode_step(token).unwrap(), &exclude)
            } else {
                greedy.decode_greedy(token, &exclude).unwrap()
            };
            assert_eq!(
                picked,
                argmax_excluding(&want, &exclude),
                "graphs {graphs}, step {i}: the GPU's pick is not the host's"
            );
            let got = greedy.last_logits();
            let same = got.len() == want.len()
                && got
                    .iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "graphs {graphs}, step {i}: logits after a greedy step differ"
            );
            token = picked;
        }
        assert_eq!(greedy.tokens(), plain.tokens());
        if graphs {
            assert!(greedy.decode_graph_captured(), "no decode graphs");
        }
    }
}
