//! Greedy and sampled picks over a DeepSeek V4 vocabulary of logits (129 280), the host work
//! between two decode steps. Run: `cargo bench -p ds4-text --bench sampler`.

use divan::Bencher;
use ds4_text::sampler::{argmax, argmax_excluding, Rng, Sampler, SamplerParams};

fn main() {
    divan::main();
}

const VOCAB: usize = 129_280;

/// Random logits with the maximum at `at`.
fn logits(at: usize) -> Vec<f32> {
    let mut rng = Rng::new(7);
    let mut v: Vec<f32> = (0..VOCAB).map(|_| rng.next_f32() * 20.0 - 10.0).collect();
    v[at] = 30.0;
    v
}

/// Greedy pick with the maximum early, in the middle and at the end of the vocabulary.
#[divan::bench(args = [100, 64_000, 129_000])]
fn greedy(bencher: Bencher, at: usize) {
    let v = logits(at);
    bencher.bench(|| argmax(divan::black_box(&v)));
}

/// `ds4 bench`'s pick (EOS excluded).
#[divan::bench(args = [64_000])]
fn greedy_excluding(bencher: Bencher, at: usize) {
    let v = logits(at);
    bencher.bench(|| argmax_excluding(divan::black_box(&v), &[1]));
}

/// A sampled pick with ds4's defaults (T 1, top_p 1, min_p 0.05: the full-vocabulary path,
/// the server's in thinking mode) and with top_k 40 / top_p 0.95 (the sorted path), on logits
/// shaped like a model's: a few strong candidates over a wide low tail.
#[divan::bench(args = [0, 40])]
fn sampled(bencher: Bencher, top_k: i32) {
    let mut rng = Rng::new(3);
    let mut v: Vec<f32> = (0..VOCAB).map(|_| rng.next_f32() * 8.0 - 4.0).collect();
    for (i, bump) in [
        (17usize, 14.0f32),
        (4_000, 13.0),
        (90_000, 12.5),
        (129_000, 11.0),
    ] {
        v[i] = bump;
    }
    let params = SamplerParams {
        top_k,
        top_p: if top_k > 0 { 0.95 } else { 1.0 },
        ..SamplerParams::default()
    };
    let mut sampler = Sampler::new(params);
    bencher.bench_local(|| sampler.sample(divan::black_box(&v)));
}
