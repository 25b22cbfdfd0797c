"""Evaluation protocols beyond leave-one-domain-out: the CoOp few-shot suite.

    few-shot        k shots per class, all classes, tested on the dataset's test split
    base2new        train on the base half (first ceil(n/2) sorted labels), test on base and,
                    with the same model, on the new half; base_acc, new_acc, hm
    cross-dataset   train on ImageNet (k shots), test on the 10 other suite datasets
    imagenet-shift  train on ImageNet (k shots), test on ImageNet-V2/-Sketch/-A/-R

`loo` (leave-one-domain-out) is the engine's own protocol (dgclip.engine). BENCHMARKS.md Part A
has every fact these follow, with file and line.
"""
from __future__ import annotations

PROTOCOLS = ("loo", "few-shot", "base2new", "cross-dataset", "imagenet-shift")
SUITE_PROTOCOLS = PROTOCOLS[1:]

__all__ = ["PROTOCOLS", "SUITE_PROTOCOLS"]
