import pytest

from graphopt.ir.errors import PipelineError
from graphopt.passes.cleanup.fold_constants import FoldConstants
from graphopt.passes.pipeline import Pipeline


def test_parse_spec_with_options_and_aliases():
    p = Pipeline.parse("fold-constants(max_growth_bytes=64), fold-bn,canonicalize(max_rounds=3)")
    assert [x.name for x in p] == ["fold-constants", "fold-batchnorm", "canonicalize"]
    assert p[0].options.max_growth_bytes == 64 and p[2].options.max_rounds == 3
    assert str(p) == "fold-constants(max_growth_bytes=64),fold-batchnorm,canonicalize(max_rounds=3)"
    assert [x.name for x in Pipeline.parse(str(p))] == [x.name for x in p]


@pytest.mark.parametrize("spec, message", [
    ("fold-constnts", "did you mean fold-constants"),
    ("fold-constants(nope=1)", "has no option nope"),
    ("fold-constants(max_growth_bytes=big)", "must be int"),
    ("fold-constants(max_growth_bytes=1", "unbalanced"),
    ("", "empty pass spec"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline.parse(spec)


def test_from_python_objects():
    assert [p.name for p in Pipeline([FoldConstants(max_rounds=2)])] == ["fold-constants"]


def test_yaml_and_toml_files(tmp_path):
    (tmp_path / "p.yaml").write_text("passes:\n  - fold-constants\n  - name: canonicalize\n    max_rounds: 2\n"
                                     "  - fold-batchnorm: {}\n")
    (tmp_path / "p.toml").write_text('[[passes]]\nname = "fold-constants"\nmax_growth_bytes = 10\n'
                                     '[[passes]]\nname = "eliminate-dead"\n')
    y, t = Pipeline.load(tmp_path / "p.yaml"), Pipeline.load(tmp_path / "p.toml")
    assert [p.name for p in y] == ["fold-constants", "canonicalize", "fold-batchnorm"]
    assert y[1].options.max_rounds == 2
    assert [p.name for p in t] == ["fold-constants", "eliminate-dead"] and t[0].options.max_growth_bytes == 10


def test_bad_pipeline_file(tmp_path):
    (tmp_path / "p.yaml").write_text("passes: 3\n")
    with pytest.raises(PipelineError, match="p.yaml: expected a list"):
        Pipeline.load(tmp_path / "p.yaml")
