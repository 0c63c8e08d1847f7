"""Tests of nnunet_topo.topology_spec: parsing, defaults, and one error per kind of invalid topology block."""
from __future__ import annotations

import copy
import json
import re
import warnings

import pytest

from nnunet_topo.topology_spec import (
    ExclusionRule,
    InclusionRule,
    Structure,
    TopologySpec,
    TopologySpecError,
    default_topology,
    describe,
    in_plane_connectivity,
    load_topology,
    parse_topology,
)

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3, "LA": 4, "AO": 5}

FULL_BLOCK = {
    "connectivity": 6,
    "structures": {"LV_epi": ["LV", "MYO"]},
    "rules": [
        {"type": "exclusion", "a": "LV", "b": "RV"},
        {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "may_touch": ["LA", "AO"], "mode": "2d",
         "axis": 0, "name": "LV inside MYO"},
    ],
    "betti": {"LV": [1, 0, 0], "MYO": [1, 0, 0], "RV": [1, 0, 0]},
    "betti_2d": {"axis": 0, "MYO": [1, 1]},
    "mesh_structures": {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV": ["RV"]},
}


def ds(topology=None, labels=None) -> dict:
    d = {"labels": dict(LABELS if labels is None else labels), "file_ending": ".nii.gz"}
    if topology is not None:
        d["topology"] = copy.deepcopy(topology)
    return d


def with_rules(*rules, **extra) -> dict:
    return ds({"rules": list(rules), **extra})


# ---------------------------------------------------------------------------------------------- valid blocks
def test_full_block():
    spec = parse_topology(ds(FULL_BLOCK))
    assert isinstance(spec, TopologySpec)
    assert spec.labels == {"RV": 1, "MYO": 2, "LV": 3, "LA": 4, "AO": 5}
    assert not spec.is_default
    assert spec.connectivity == 6 and spec.in_plane_connectivity == 4
    excl, incl = spec.rules
    assert excl == ExclusionRule("exclusion(LV,RV)", Structure("LV", ("LV",), (3,)), Structure("RV", ("RV",), (1,)),
                                 "3d", 0)
    assert isinstance(incl, InclusionRule)
    assert incl.name == "LV inside MYO"
    assert incl.inner == Structure("LV", ("LV",), (3,))
    assert incl.outer == Structure("LV+MYO", ("LV", "MYO"), (3, 2))
    assert incl.may_touch == Structure("LA+AO", ("LA", "AO"), (4, 5))
    assert (incl.mode, incl.axis) == ("2d", 0)
    assert spec.rule_names == ("exclusion(LV,RV)", "LV inside MYO")
    assert spec.betti == {"LV": (1, 0, 0), "MYO": (1, 0, 0), "RV": (1, 0, 0)}
    assert spec.betti_2d == {"MYO": ((1, 1),)} and spec.betti_2d_axis == 0  # one vector: a 1-element set
    assert set(spec.betti_structures) == {"LV", "MYO", "RV"}
    assert spec.betti_structures["MYO"].label_ids == (2,)
    assert spec.mesh_structures["LV_epi"] == Structure("LV_epi", ("LV", "MYO"), (3, 2))
    assert spec.mesh_structures["LV_endo"].label_ids == (3,)
    assert spec.structures["LV_epi"].label_ids == (3, 2)


@pytest.mark.parametrize("rule, expected_name", [
    ({"type": "exclusion", "a": "LV", "b": "RV"}, "exclusion(LV,RV)"),
    ({"type": "exclusion", "a": ["LV", "MYO"], "b": "RV"}, "exclusion(LV+MYO,RV)"),
    ({"type": "exclusion", "a": "LV_epi", "b": "RV"}, "exclusion(LV_epi,RV)"),
    ({"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"]}, "inclusion(LV in LV+MYO)"),
    ({"type": "inclusion", "inner": "LV", "outer": "LV_epi", "may_touch": ["LA", "AO"]},
     "inclusion(LV in LV_epi | may_touch LA+AO)"),
    ({"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "may_touch": ["LA", "AO"]},
     "inclusion(LV in LV+MYO | may_touch LA+AO)"),
    ({"type": "exclusion", "a": "LV", "b": "RV", "mode": "2d"}, "exclusion(LV,RV) [2d axis 0]"),
    ({"type": "exclusion", "a": "LV", "b": "RV", "mode": "2d", "axis": 2}, "exclusion(LV,RV) [2d axis 2]"),
    ({"type": "exclusion", "a": "LV", "b": "RV", "name": "septum"}, "septum"),
])
def test_default_rule_names(rule, expected_name):
    spec = parse_topology(ds({"structures": {"LV_epi": ["LV", "MYO"]}, "rules": [rule]}))
    assert spec.rules[0].name == expected_name


def test_defaults_within_block():
    spec = parse_topology(ds({}))
    assert spec.rules == () and spec.betti == {} and spec.betti_2d == {} and spec.mesh_structures == {}
    assert spec.connectivity == 6 and spec.betti_2d_axis == 0 and not spec.is_default
    rule = parse_topology(with_rules({"type": "exclusion", "a": "LV", "b": "RV"})).rules[0]
    assert (rule.mode, rule.axis) == ("3d", 0)
    rule = parse_topology(with_rules({"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"],
                                      "may_touch": None})).rules[0]
    assert rule.may_touch is None


def test_same_rule_in_3d_and_2d_gets_distinct_default_names():
    spec = parse_topology(with_rules({"type": "exclusion", "a": "LV", "b": "RV"},
                                     {"type": "exclusion", "a": "LV", "b": "RV", "mode": "2d", "axis": 0}))
    assert len(set(spec.rule_names)) == 2


def test_connectivity_26_and_betti_on_structure():
    spec = parse_topology(ds({"connectivity": 26, "structures": {"LV_epi": ["LV", "MYO"]},
                              "betti": {"LV_epi": [1, 0, 0]}, "betti_2d": {"axis": 2, "LV_epi": [1, 0]}}))
    assert spec.connectivity == 26 and spec.in_plane_connectivity == 8
    assert spec.betti_structures["LV_epi"].label_ids == (3, 2)
    assert spec.betti_2d == {"LV_epi": ((1, 0),)} and spec.betti_2d_axis == 2


@pytest.mark.parametrize("ref, expected", [
    ("LV", Structure("LV", ("LV",), (3,))),
    (["LV", "MYO"], Structure("LV+MYO", ("LV", "MYO"), (3, 2))),
    (("MYO",), Structure("MYO", ("MYO",), (2,))),
    ("LV_epi", Structure("LV_epi", ("LV", "MYO"), (3, 2))),
])
def test_structure_lookup(ref, expected):
    spec = parse_topology(ds(FULL_BLOCK))
    assert spec.structure(ref) == expected
    assert spec.structure(expected) is expected


def test_structure_lookup_unknown():
    spec = parse_topology(ds(FULL_BLOCK))
    with pytest.raises(TopologySpecError, match="unknown label 'PA'"):
        spec.structure("PA")


def test_ignore_label_is_not_foreground():
    spec = parse_topology(ds({}, labels={"background": 0, "LV": 1, "ignore": 2}))
    assert spec.labels == {"LV": 1}


def test_load_topology(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(ds(FULL_BLOCK)))
    for arg in (path, str(path), tmp_path, ds(FULL_BLOCK)):
        assert load_topology(arg) == parse_topology(ds(FULL_BLOCK))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TopologySpecError, match="bad.json"):
        load_topology(tmp_path / "bad.json")


def test_default_topology_warns():
    with pytest.warns(UserWarning, match="no 'topology' block"):
        spec = default_topology(LABELS)
    assert spec.is_default and spec.rules == ()
    assert spec.betti == {n: (1, 0, 0) for n in ("RV", "MYO", "LV", "LA", "AO")}
    assert spec.betti_structures["LV"] == Structure("LV", ("LV",), (3,))
    assert spec.mesh_structures == {}
    with pytest.warns(UserWarning, match="no 'topology' block"):
        assert parse_topology(ds()) == spec


def test_valid_block_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_topology(ds(FULL_BLOCK))


def test_describe():
    text = describe(parse_topology(ds(FULL_BLOCK)))
    for part in ("connectivity 6", "    - exclusion(LV,RV)\n",
                 "LV inside MYO = inclusion(LV in LV+MYO | may_touch LA+AO) [2d axis 0]", "LV_epi=LV+MYO",
                 "MYO (1, 1)"):
        assert part in text
    with pytest.warns(UserWarning):
        assert "defaults" in describe(default_topology(LABELS))


def test_in_plane_connectivity():
    assert in_plane_connectivity(6) == 4 and in_plane_connectivity(26) == 8
    with pytest.raises(ValueError):
        in_plane_connectivity(4)


# ---------------------------------------------------------------------------------------------- invalid blocks
EXCL = {"type": "exclusion", "a": "LV", "b": "RV"}
INCL = {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"]}

INVALID = [
    # (id, dataset.json, regex the message must match)
    ("topology not a dict", ds(["rules"]), "'topology' must be a dict"),
    ("unknown top-level key", ds({"rule": []}), r"unknown key 'rule'.*allowed keys.*Did you mean 'rules'"),
    ("rules not a list", ds({"rules": {"a": 1}}), "rules must be a list"),
    ("rule not a dict", with_rules("LV-RV"), r"rules\[0\].*must be a dict"),
    ("missing type", with_rules({"a": "LV", "b": "RV"}), r"rules\[0\].*missing required key 'type'"),
    ("unknown rule type", with_rules({"type": "exclude", "a": "LV", "b": "RV"}),
     r"unknown rule type 'exclude'.*Did you mean 'exclusion'"),
    ("unknown rule key", with_rules({**INCL, "may_tuch": ["LA"]}),
     r"rules\[0\] \(inclusion\): unknown key 'may_tuch'.*Did you mean 'may_touch'"),
    ("inclusion key in exclusion", with_rules({**EXCL, "inner": "LV"}), r"unknown key 'inner'"),
    ("missing b", with_rules({"type": "exclusion", "a": "LV"}), r"missing required key 'b'"),
    ("missing outer", with_rules({"type": "inclusion", "inner": "LV"}), r"missing required key 'outer'"),
    ("unknown label", with_rules({**EXCL, "b": "RVV"}),
     r"rules\[0\] \(exclusion\)\.b: unknown label 'RVV'.*Known labels: 'RV', 'MYO', 'LV'.*Did you mean 'RV'"),
    ("unknown label in list", with_rules({**INCL, "outer": ["LV", "MYOCARD"]}),
     r"outer\[1\]: unknown label 'MYOCARD'"),
    ("background in structure", with_rules({**INCL, "outer": ["LV", "MYO", "background"]}),
     r"'background' is the background label"),
    ("background as b", with_rules({**EXCL, "b": "background"}), r"'background' is the background label"),
    ("ignore label", ds({"rules": [{**EXCL, "b": "ignore"}]}, labels={**LABELS, "ignore": 9}),
     r"'ignore' is nnU-Net's ignore label"),
    ("a == b", with_rules({**EXCL, "b": "LV"}), r"same structure twice \(a='LV', b='LV'\)"),
    ("a == b via region", with_rules({"type": "exclusion", "a": ["LV", "MYO"], "b": ["MYO", "LV"]}),
     r"same structure twice"),
    ("a and b overlap", with_rules({"type": "exclusion", "a": ["LV", "MYO"], "b": ["MYO", "RV"]}),
     r"share label\(s\) 'MYO'"),
    ("inner == outer", with_rules({**INCL, "outer": "LV"}), r"same structure twice \(inner='LV', outer='LV'\)"),
    ("outer misses inner", with_rules({**INCL, "outer": "MYO"}),
     r"outer='MYO' must contain every label of inner='LV'.*missing 'LV'"),
    ("may_touch overlaps inner", with_rules({**INCL, "may_touch": ["LA", "LV"]}),
     r"may_touch='LA\+LV' contains label\(s\) 'LV' of inner"),
    ("may_touch overlaps outer", with_rules({**INCL, "may_touch": ["MYO", "LA"]}),
     r"may_touch='MYO\+LA' contains label\(s\) 'MYO' of outer.*redundant"),
    ("empty region", with_rules({**INCL, "may_touch": []}), r"may_touch: a region must list at least one"),
    ("label twice in region", with_rules({**INCL, "outer": ["LV", "MYO", "LV"]}), r"label 'LV' is listed twice"),
    ("structure inside list", ds({"structures": {"LV_epi": ["LV", "MYO"]},
                                  "rules": [{"type": "exclusion", "a": ["LV_epi", "RV"], "b": "LA"}]}),
     r"'LV_epi' is a structure \(LV\+MYO\), not a label"),
    ("non-string reference", with_rules({**EXCL, "a": 3}), r"\.a: expected a label name"),
    ("bad mode", with_rules({**EXCL, "mode": "2D"}), r"mode must be \"3d\" or \"2d\".*'2D'"),
    ("bad axis", with_rules({**EXCL, "mode": "2d", "axis": 3}), r"axis must be an integer 0, 1 or 2.*3"),
    ("bool axis", with_rules({**EXCL, "mode": "2d", "axis": True}), r"axis must be an integer"),
    ("bad rule name", with_rules({**EXCL, "name": ""}), r"name must be a non-empty string"),
    ("exempt_end_slices on a 3d rule", with_rules({**INCL, "exempt_end_slices": 1}),
     r"rules\[0\] \(inclusion\) rule 'inclusion\(LV in LV\+MYO\)': exempt_end_slices is only for rules with "
     r"\"mode\": \"2d\""),
    ("exempt_end_slices on an explicit 3d rule", with_rules({**EXCL, "mode": "3d", "exempt_end_slices": 0}),
     r"rule 'exclusion\(LV,RV\)': exempt_end_slices is only for rules with \"mode\": \"2d\""),
    ("exempt_end_slices negative", with_rules({**EXCL, "mode": "2d", "exempt_end_slices": -1}),
     r"rule 'exclusion\(LV,RV\) \[2d axis 0\]': exempt_end_slices must be a non-negative integer.*-1"),
    ("exempt_end_slices float", with_rules({**INCL, "mode": "2d", "exempt_end_slices": 1.0, "name": "cavity"}),
     r"rule 'cavity': exempt_end_slices must be a non-negative integer.*1\.0"),
    ("exempt_end_slices bool", with_rules({**INCL, "mode": "2d", "exempt_end_slices": True}),
     r"exempt_end_slices must be a non-negative integer.*True"),
    ("exempt_end_slices string", with_rules({**INCL, "mode": "2d", "exempt_end_slices": "1"}),
     r"exempt_end_slices must be a non-negative integer.*'1'"),
    ("exempt_end_slices misspelt", with_rules({**INCL, "mode": "2d", "exempt_end_slice": 1}),
     r"unknown key 'exempt_end_slice'; allowed keys: .*'exempt_end_slices'.*Did you mean 'exempt_end_slices'"),
    ("same rule with and without exempt_end_slices", with_rules({**EXCL, "mode": "2d"},
                                                                {**EXCL, "mode": "2d", "exempt_end_slices": 1}),
     r"rules\[1\]: rule name 'exclusion\(LV,RV\) \[2d axis 0\]' is used twice.*unique \"name\""),
    ("duplicate rule name", with_rules(EXCL, {**EXCL, "a": "MYO", "name": "exclusion(LV,RV)"}),
     r"rules\[1\]: rule name 'exclusion\(LV,RV\)' is used twice \(also topology.rules\[0\]\)"),
    ("duplicate default rule name", with_rules(EXCL, dict(EXCL)), r"'exclusion\(LV,RV\)' is used twice"),
    ("betti too short", ds({"betti": {"LV": [1, 0]}}), r"betti\['LV'\]: a Betti vector must be a list of 3"),
    ("betti negative", ds({"betti": {"LV": [1, -1, 0]}}), r"betti\['LV'\].*non-negative"),
    ("betti float", ds({"betti": {"LV": [1.0, 0, 0]}}), r"betti\['LV'\]"),
    ("betti not a list", ds({"betti": {"LV": 1}}), r"betti\['LV'\]"),
    ("betti_2d length", ds({"betti_2d": {"MYO": [1, 1, 0]}}),
     r"betti_2d\['MYO'\]: a Betti vector must be a list of 2"),
    ("betti_2d axis", ds({"betti_2d": {"axis": -1, "MYO": [1, 1]}}), r"betti_2d: axis must be"),
    ("betti_2d empty set", ds({"betti_2d": {"MYO": []}}),
     r"betti_2d\['MYO'\]: an empty set of allowed Betti vectors allows no slice"),
    ("betti_2d set with a short vector", ds({"betti_2d": {"MYO": [[1, 1], [1]]}}),
     r"betti_2d\['MYO'\]\[1\]: a Betti vector must be a list of 2 .*got \[1\]"),
    ("betti_2d set with a negative entry", ds({"betti_2d": {"MYO": [[1, 1], [1, -1]]}}),
     r"betti_2d\['MYO'\]\[1\]: a Betti vector must be a list of 2 non-negative integers"),
    ("betti_2d set with a float entry", ds({"betti_2d": {"MYO": [[1.5, 1], [1, 0]]}}),
     r"betti_2d\['MYO'\]\[0\]: a Betti vector"),
    ("betti_2d set mixing numbers and vectors", ds({"betti_2d": {"MYO": [[1, 1], 1]}}),
     r"betti_2d\['MYO'\]: mixes numbers and lists"),
    ("betti_2d set with a duplicate", ds({"betti_2d": {"MYO": [[1, 1], [1, 0], [1, 1]]}}),
     r"betti_2d\['MYO'\]: the allowed set lists \[1, 1\] more than once"),
    ("betti 3d sets are not supported", ds({"betti": {"LV": [[1, 0, 0], [1, 1, 0]]}}),
     r"betti\['LV'\]: a Betti vector must be a list of 3"),
    ("betti unknown key", ds({"betti": {"Myo": [1, 0, 0]}}),
     r"betti\['Myo'\]: unknown label 'Myo'.*Did you mean 'MYO'"),
    ("betti_2d unknown key", ds({"betti_2d": {"PA": [1, 0]}}), r"betti_2d\['PA'\]: unknown label 'PA'"),
    ("betti not a dict", ds({"betti": [[1, 0, 0]]}), r"topology.betti must be a dict"),
    ("connectivity", ds({"connectivity": 18}), r"connectivity must be 6.*or 26.*18"),
    ("connectivity 4", ds({"connectivity": 4}), r"connectivity must be 6"),
    ("structure collides with label", ds({"structures": {"MYO": ["LV", "MYO"]}}),
     r"structures\['MYO'\]: structure name 'MYO' collides with the label"),
    ("structure of unknown label", ds({"structures": {"LV_epi": ["LV", "MYOCARDIUM"]}}),
     r"structures\['LV_epi'\]\[1\]: unknown label 'MYOCARDIUM'"),
    ("mesh name mismatching label", ds({"mesh_structures": {"RV": ["LV"]}}),
     r"mesh_structures\['RV'\]: the mesh name 'RV' is also a label"),
    ("mesh unknown label", ds({"mesh_structures": {"LV_epi": ["LV", "MY0"]}}), r"unknown label 'MY0'"),
    ("region-based labels", ds({}, labels={"background": 0, "whole": [1, 2], "core": 2}),
     r"label 'whole'.*region-based \(sigmoid\) label definitions are not supported"),
    ("bad label id", ds({}, labels={"background": 0, "LV": "1"}), r"label 'LV' must have a non-negative integer"),
    ("duplicate label id", ds({}, labels={"background": 0, "LV": 1, "RV": 1}), r"'LV' and 'RV' have the same id 1"),
    ("no labels", {"topology": {}}, r"no 'labels' key"),
    ("reference exception not a list", with_rules(EXCL, reference_exceptions={"cases": ["c1"]}),
     r"topology.reference_exceptions must be a list"),
    ("reference exception without cases", with_rules(EXCL, reference_exceptions=[{"rules": ["exclusion(LV,RV)"]}]),
     r"reference_exceptions\[0\].cases must be a non-empty list"),
    ("reference exception of an unknown rule", with_rules(EXCL, reference_exceptions=[
        {"cases": ["c1"], "rules": ["exclusion(LV,Rv)"]}]),
     r"reference_exceptions\[0\].rules: 'exclusion\(LV,Rv\)' is not a voxel rule.*Did you mean 'exclusion\(LV,RV\)'"),
    ("reference exception with an unknown key", with_rules(EXCL, reference_exceptions=[
        {"cases": ["c1"], "rule": ["exclusion(LV,RV)"]}]), r"reference_exceptions\[0\]: unknown key 'rule'"),
    ("reference exception with a numeric case", with_rules(EXCL, reference_exceptions=[{"cases": [12]}]),
     r"reference_exceptions\[0\].cases"),
]


@pytest.mark.parametrize("dataset_json, pattern", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_blocks(dataset_json, pattern):
    with pytest.raises(TopologySpecError, match=pattern) as info:
        parse_topology(dataset_json)
    assert isinstance(info.value, ValueError)


def test_error_is_value_error_and_not_a_dict_dataset():
    with pytest.raises(ValueError, match="must be a dict"):
        parse_topology(["labels"])  # type: ignore[arg-type]


def test_default_topology_rejects_region_labels():
    with pytest.raises(TopologySpecError, match="region-based"):
        default_topology({"background": 0, "whole": [1, 2]})


def test_messages_are_single_readable_sentences():
    # every message names the location in the block so users find the offender
    for _, dataset_json, _ in INVALID:
        try:
            parse_topology(dataset_json)
        except TopologySpecError as e:
            assert re.search(r"topology|dataset\.json|label", str(e)), str(e)


def test_rule_names_stay_unambiguous_for_any_label_name():
    """Label names with commas, brackets, '+', '|', spaces or quotes are quoted in rule names, and the names read
    back (parse_rule_name) to the structures they were made from."""
    from nnunet_topo.topology_spec import parse_rule_name

    odd = ["A,B", "C", "x+y", "x", "y", "in", "left (LV)", 'say "hi"', "may_touch", "v|w", "[2d axis 0]"]
    labels = {"background": 0, **{n: i + 1 for i, n in enumerate(odd)}}
    rules = [{"type": "exclusion", "a": "A,B", "b": "C"},
             {"type": "exclusion", "a": "C", "b": "A,B"},
             {"type": "exclusion", "a": ["x", "y"], "b": "x+y"},
             {"type": "inclusion", "inner": "in", "outer": ["in", "left (LV)"], "may_touch": ['say "hi"', "v|w"],
              "mode": "2d", "axis": 1},
             {"type": "inclusion", "inner": "may_touch", "outer": ["may_touch", "[2d axis 0]"]}]
    spec = parse_topology({"labels": labels, "topology": {"rules": rules}})
    names = spec.rule_names
    assert len(set(names)) == len(names)
    assert names[0] == 'exclusion("A,B",C)' and names[2] == 'exclusion(x+y,"x+y")'
    for raw, rule in zip(rules, spec.rules):
        back = parse_rule_name(rule.name)
        assert back["type"] == raw["type"] and back["mode"] == raw.get("mode", "3d")
        assert back["axis"] == raw.get("axis", 0)
        for key in ("a", "b", "inner", "outer", "may_touch"):
            if key in raw:
                want = raw[key]
                assert back[key] == (tuple(want) if isinstance(want, list) else (want,)), (rule.name, key)
    # a label named "A+B" and the region A+B no longer share a name
    spec2 = parse_topology({"labels": {"background": 0, "A": 1, "B": 2, "A+B": 3, "R": 4},
                            "topology": {"rules": [{"type": "exclusion", "a": ["A", "B"], "b": "R"},
                                                   {"type": "exclusion", "a": "A+B", "b": "R"}]}})
    assert len(set(spec2.rule_names)) == 2
    with pytest.raises(ValueError, match="not a default rule name"):
        parse_rule_name("LV inside MYO")


# ---------------------------------------------------------------------------------------------- exempt_end_slices
def test_exempt_end_slices_parsing_keeps_default_names():
    spec = parse_topology(with_rules(
        {**INCL, "mode": "2d", "axis": 0, "exempt_end_slices": 1},
        {**EXCL, "mode": "2d", "axis": 2, "exempt_end_slices": 3},
        {**INCL, "mode": "2d", "axis": 1, "exempt_end_slices": 0},
        {**EXCL, "mode": "2d", "axis": 1},
        EXCL))
    assert [r.exempt_end_slices for r in spec.rules] == [1, 3, 0, 0, 0]
    assert spec.rule_names == ("inclusion(LV in LV+MYO) [2d axis 0]", "exclusion(LV,RV) [2d axis 2]",
                               "inclusion(LV in LV+MYO) [2d axis 1]", "exclusion(LV,RV) [2d axis 1]",
                               "exclusion(LV,RV)")
    assert all(type(r.exempt_end_slices) is int for r in spec.rules)
    # two rules that differ only in the key need a name
    named = parse_topology(with_rules({**EXCL, "mode": "2d"},
                                      {**EXCL, "mode": "2d", "exempt_end_slices": 1, "name": "septum, base free"}))
    assert named.rule_names == ("exclusion(LV,RV) [2d axis 0]", "septum, base free")
    assert [r.exempt_end_slices for r in named.rules] == [0, 1]
    text = describe(spec)
    assert "    - inclusion(LV in LV+MYO) [2d axis 0] (end slices exempt: 1 at each end)\n" in text
    assert "    - exclusion(LV,RV) [2d axis 1]\n" in text


def test_exempt_end_slices_survives_axis_mapping_and_reference_spec():
    from nnunet_topo.topology_spec import reference_spec, spec_in_patch_frame

    spec = parse_topology(with_rules({**INCL, "mode": "2d", "axis": 0, "exempt_end_slices": 2},
                                     {**EXCL, "mode": "2d", "axis": 2, "exempt_end_slices": 1}))
    moved = spec_in_patch_frame(spec, (2, 0, 1))  # preprocessed axis k = image axis transpose_forward[k]
    assert [(r.axis, r.exempt_end_slices) for r in moved.rules] == [(1, 2), (0, 1)]
    assert moved.rule_names == spec.rule_names
    sparse = reference_spec(spec, 9)
    assert [r.exempt_end_slices for r in sparse.rules] == [2, 1]
    assert sparse.rules[0].may_touch is not None and 9 in sparse.rules[0].may_touch.label_ids


# ---------------------------------------------------------------------------------------------- betti_2d allowed sets
def test_betti_2d_allowed_sets_parse_describe_and_survive_frames():
    from nnunet_topo.topology_spec import label_priors, reference_spec, spec_in_patch_frame

    spec = parse_topology(ds({"betti": {"MYO": [1, 1, 0]},
                              "betti_2d": {"axis": 0, "MYO": [[1, 1], [1, 0]], "LV": [1, 0],
                                           "LV_epi": [[1, 0]], "RV": [(1, 0), (2, 0)]},
                              "structures": {"LV_epi": ["LV", "MYO"]}}))
    # order as written; a single vector and a 1-element list are the same 1-element set
    assert spec.betti_2d == {"MYO": ((1, 1), (1, 0)), "LV": ((1, 0),), "LV_epi": ((1, 0),),
                             "RV": ((1, 0), (2, 0))}
    assert spec.betti == {"MYO": (1, 1, 0)}
    assert "MYO (1, 1) or (1, 0), LV (1, 0), LV_epi (1, 0), RV (1, 0) or (2, 0)" in describe(spec)
    p3, p2 = label_priors(spec)
    assert p3 == {2: (1, 1, 0)}
    assert p2 == {2: ((1, 1), (1, 0)), 3: ((1, 0),), 1: ((1, 0), (2, 0))}  # LV_epi is a region: left out
    moved = spec_in_patch_frame(spec, (2, 0, 1))
    assert moved.betti_2d == spec.betti_2d and moved.betti_2d_axis == 1
    assert reference_spec(spec, 9).betti_2d == spec.betti_2d


def test_reference_exceptions_are_parsed_and_described():
    spec = parse_topology(with_rules(EXCL, reference_exceptions=[
        {"cases": ["c1", "c2"], "rules": ["exclusion(LV,RV)"], "reason": "septum gap"}, {"cases": ["c9"]}]))
    first, every = spec.reference_exceptions
    assert first.cases == ("c1", "c2") and first.rules == ("exclusion(LV,RV)",) and first.reason == "septum gap"
    assert spec.reference_exception("exclusion(LV,RV)", "c2") is first
    assert spec.reference_exception("exclusion(LV,RV)", "c9") is every and every.rules == ()
    assert spec.reference_exception("exclusion(LV,RV)", "c3") is None
    assert "c1, c2 excepted from the reference check of rule(s) exclusion(LV,RV) (septum gap)" in describe(spec)
