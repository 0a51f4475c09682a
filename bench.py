"""
Benchmarks. Every target is a ratio measured side by side in one process (interleaved, medians),
because these machines are shared and noisy: absolute times across runs mean little.

    python bench.py                  # every section
    python bench.py model prepare    # some sections: model, prepare, train, sample
"""
import sys


def bench_model():
    raise NotImplementedError  # model section (issue 2)


def bench_prepare():
    raise NotImplementedError  # prepare section (issue 3)


def bench_train():
    raise NotImplementedError  # train section (issue 4)


def bench_sample():
    raise NotImplementedError  # sample section (issue 5)


SECTIONS = {"model": bench_model, "prepare": bench_prepare, "train": bench_train, "sample": bench_sample}

if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            sys.exit(f"bench.py: unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        SECTIONS[name]()
