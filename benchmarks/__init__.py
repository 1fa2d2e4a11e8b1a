"""genfast's benchmarks, installed as ``genfast.benchmarks`` and run by ``genfast bench``.

``harness`` times and reports; each ``bench_<family>.py`` declares that
family's cases (shapes from real models plus a size sweep) and providers
(genfast per backend, eager PyTorch, torch.compile, the reference, peers).
To benchmark a new family, add a ``bench_<family>.py`` with ``CASES`` and
``providers(device_type)``; the harness finds it by its name.
"""
