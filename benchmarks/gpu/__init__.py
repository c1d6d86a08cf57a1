"""The parts of the GPU suite (benchmarks/gpu_suite.py), one module each, in the order they run:

    tests      the `gpu`-marked tests, on the machine's own torch
    kernel     the nearest-code kernel against torch's cdist/mm + argmin, and the bf16 matmul rate
    encoders   img/s of the 28 px conv and the 256 px llamagen-vq16 encoders (fp32, bf16, channels_last, compile)
    train      training steps through the trainer: tokenizers img/s, priors tokens/s
    sample     prior sampling images/s (class and text priors, 7x7 and 16x16 grids)
    tokenize   Ray-free tokenization: decode processes -> encoder on the GPU -> Parquet commit

Each module has TITLE and run(part), where part is a common.Part: it says whether this is a
CPU smoke run and how much of the part's time limit (gpu_suite.LIMITS) is left, and writes the
tables as they fill (common.py). priors.py holds the priors that train and sample share."""
