"""gpu_peak_flops: exact device-name lookup of dense bf16 tensor peaks."""

import pytest

from crate_lm.hardware import gpu_peak_flops

KNOWN = {
    "NVIDIA H100 80GB HBM3": 989.4e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A10": 125e12,
    "NVIDIA L4": 121e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L40S": 362e12,
    "Tesla V100-SXM2-16GB": 125e12,
    "Tesla V100-SXM2-32GB": 125e12,
    "Tesla V100-PCIE-16GB": 112e12,
    "Tesla V100-PCIE-32GB": 112e12,
    "AMD Instinct MI300X": 1307e12,
}


@pytest.mark.parametrize(("name", "flops"), KNOWN.items())
def test_known_names_map_to_their_figures(name, flops):
    assert gpu_peak_flops(name) == flops


def test_names_that_substring_matching_confused():
    assert gpu_peak_flops("NVIDIA L40") != gpu_peak_flops("NVIDIA L4")
    assert gpu_peak_flops("NVIDIA H100 NVL") != gpu_peak_flops("NVIDIA H100 80GB HBM3")
    assert gpu_peak_flops("NVIDIA RTX A1000") is None


@pytest.mark.parametrize(
    "name", ["NVIDIA GeForce RTX 4090", "", "   ", "NVIDIA", "NVIDIA H100", "H100", "NVIDIA A10G", "L4 something"]
)
def test_unknown_names_give_none(name):
    assert gpu_peak_flops(name) is None


@pytest.mark.parametrize(
    "name", ["nvidia h100 80gb hbm3", "  NVIDIA   H100 80GB\tHBM3 ", "H100 80GB HBM3", "Nvidia H100 80gb Hbm3"]
)
def test_case_and_space_variations_still_match(name):
    assert gpu_peak_flops(name) == 989.4e12
