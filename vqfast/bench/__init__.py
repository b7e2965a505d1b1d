"""The benchmark runner behind ``vqfast bench`` and the scripts in benchmarks/.

    timing.py      medians / best of many runs, warm-up excluded, CUDA events on GPU
    providers.py   who is measured: the seeds' code, chunked torch, each vqfast backend, faiss-cpu,
                   vector-quantize-pytorch
    presets.py     the shapes and repeat counts of each preset (tiny, quick, full)
    forward.py     question 1: nearest-codeword forward over (N, D, K) and dtypes
    train_step.py  question 2: forward + backward + optimizer step of VQ and residual VQ
    multiscale.py  question 3: VAR multi-scale tokenisation of an image batch
    memory.py      question 4: peak memory (a subprocess per provider on CPU)
    faiss_cpu.py   question 5 (only when named): vqfast cpu vs faiss-cpu at one CPU instruction level
    results.py     environment fields, ratios, JSONL results files
    table.py       the printed table
    cli.py         the ``vqfast bench`` subcommand
"""
