"""The study library: what the experiment scripts share (each script is a thin command line).

- ``timing``: one timer, the results stamp, JSON writing, the benchmark command line;
- ``metrics``: the one ``rel_err``, next-token metrics against a reference forward, retrieval
  scoring, interpolation at a density;
- ``probes``: real texts, retrieval needles and questions, evaluation sequences;
- ``retrieval``: one-needle prompts whose answer is generated (sparse prefill, dense decode) and
  scored by exact match (experiments/accuracy.py);
- ``specs``: the compared attention specs (thresholded selectors, sink + local window, capture,
  fixed density);
- ``forward``: forward passes of the real model (prefill, scored logits, greedy continuation);
- ``attention_mass``: exact attention mass inside block masks (coverage, output error);
- ``kernels``: the kernel benchmarks' contenders (cuDNN, Triton, Mosaic) and FLOP rates;
- ``synthetic``: inputs with the attention structure of real long-context heads;
- ``report``: number formatting, markdown rows, figures, readable JSON;
- ``cli``: what command lines share: argparse types, progress with elapsed times on stderr;
- ``prefill_checks`` / ``prefill_report``: pbs-prefill's input checks (text, checkpoint header,
  length, dense layers; before any weights load) and its table, continuations and summary
  (experiments/prefill.py is its command line);
- ``coverage_results`` / ``coverage_study`` / ``coverage_report``: the coverage study's records,
  measurements and report (experiments/coverage.py is its command line).
"""
