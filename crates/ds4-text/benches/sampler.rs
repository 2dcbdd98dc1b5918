//! Greedy and sampled picks over a DeepSeek V4 vocabulary of logits (129 280), the host work
//! between two decode steps. Run: `cargo bench -p ds4-text --bench sampler`.

use divan::Bencher;
use ds4_text::sampler::{argmax, argmax_excluding, Rng};

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
