import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # benchmarks/_memory.py and factories importable in spawned children
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_report_header(config):
    import dgkernels

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return [f"dgkernels backends: " + ", ".join(k for k, v in dgkernels.backends().items() if v.available),
            f"device: {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}"]
