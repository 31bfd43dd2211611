"""models.state_dicts: one comparison of a weight file with a network, one wording for every loader."""
import torch

from models.state_dicts import KeyMismatch, compare_state_dicts, mismatch_message


def test_a_fitting_file_is_no_mismatch():
    net = torch.nn.Linear(3, 2).state_dict()
    assert not compare_state_dicts(net, {k: v.clone() for k, v in net.items()})


def test_every_missing_unexpected_and_misshaped_key_is_listed_sorted():
    net = {"b.weight": torch.zeros(2, 3), "a.weight": torch.zeros(4), "c.bias": torch.zeros(2)}
    got = {"a.weight": torch.zeros(5), "z.extra": torch.zeros(1), "y.extra": torch.zeros(1), "c.bias": torch.zeros(2)}
    m = compare_state_dicts(net, got)
    assert m == KeyMismatch(missing=["b.weight"], unexpected=["y.extra", "z.extra"],
                            mismatched=["a.weight: file (5,) vs network (4,)"])
    assert mismatch_message("w.safetensors", "the network", m) == (
        "w.safetensors does not fit the network: missing keys (1): b.weight; unexpected keys (2): y.extra, z.extra; "
        "shape mismatches (1): a.weight: file (5,) vs network (4,)")


def test_long_lists_are_cut_with_a_count():
    m = compare_state_dicts({f"k{i:03d}": torch.zeros(1) for i in range(50)}, {})
    text = m.describe(limit=3)
    assert text == "missing keys (50): k000, k001, k002, … (+47 more)"


def test_meta_tensors_compare_by_shape():
    with torch.device("meta"):
        net = torch.nn.Linear(3, 2).state_dict()
    assert not compare_state_dicts(net, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)})
