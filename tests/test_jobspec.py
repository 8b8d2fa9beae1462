"""Job settings: one model per job kind, spec files, --set, the flags derived from the models, and
every spec in jobs/ (each must validate, and name only repo paths that exist, URLs or hub ids)."""

from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser, main
from pipeline.config.settings import (
    AUTO,
    DEFAULT_WEIGHTS,
    KINDS,
    PRECISIONS,
    SCALES,
    EvalJob,
    TrainJob,
    UpscaleJob,
)
from pipeline.config.specfile import build_job, load_spec
from pipeline.errors import InvalidSettingsError, SettingsError
from pipeline.io.storage import is_url

REPO = Path(__file__).resolve().parent.parent
SPECS = sorted((REPO / "jobs").glob("*.yaml"))
# read, so they must exist
INPUTS = ("source", "sources", "data", "lr_data", "val_data", "init_weights", "weights")


def _spec(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_every_spec_in_jobs_validates_and_names_what_exists(path, monkeypatch):
    monkeypatch.chdir(REPO)  # relative paths in specs are read from where pan runs: the repo here
    spec = load_spec(path)
    assert spec.kind in KINDS and isinstance(spec.job, KINDS[spec.kind])
    for key in INPUTS:
        values = getattr(spec.job, key, None)
        for value in values if isinstance(values, tuple) else [values]:
            if value is None or is_url(value) or not Path(value).is_absolute():  # URL or hub id
                continue
            for scale in SCALES:  # eval weights may hold {scale}
                local = Path(value.replace("{scale}", str(scale)))
                assert local.exists(), f"{path.name}: {key}: {value} does not exist in the repo"


def test_every_kind_has_a_spec_and_the_nightly_one_is_scheduled():
    kinds = {load_spec(p).kind for p in SPECS}
    assert kinds == set(KINDS) == {"upscale", "prepare", "train", "eval"}
    assert load_spec(REPO / "jobs/nightly-upscale.yaml").schedule == "0 2 * * *"
    card = load_spec(REPO / "jobs/eval-model-card.yaml").job
    assert card.scale == (2, 3, 4) and card.weights == DEFAULT_WEIGHTS
    assert [d.rsplit("/", 1)[-1] for d in card.data] == ["Set5", "Set14", "BSD100", "Urban100"]


def test_a_path_under_an_existing_folder_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    # The bug in the old retrain spec: val_data "benchmarks/Set5" (missing) was read as a repo id.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks").mkdir()
    job = TrainJob(data="someone/div2k", val_data="benchmarks/Set5", scale=2, name="x")
    assert job.val_data == str(tmp_path / "benchmarks/Set5") and job.data == "someone/div2k"


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("kind: upscale\nsource: a\ndest: b\nscale: 2\ntilee: 64\n",
         "tilee: not a setting of upscale jobs (did you mean tile?)"),
        ("kind: upscale\nsource: a\ndest: b\n", "scale is required"),
        ("kind: upscale\nsource: a\ndest: b\nscale: 5\n", "scale: Input should be 2, 3 or 4"),
        ("kind: upscal\n", "kind 'upscal' is unknown (choose one of upscale, prepare, train, eval)"),
        ("source: a\n", "no kind: key"),
        ("kind: eval\ndata: [a]\nscale: 2\nschedule: nightly\n", "schedule: 'nightly' is not a cron line"),
        ("kind: eval\ndata: []\nscale: 2\n", "data: Value should have at least 1 item"),
        ("kind: train\ndata: a\nscale: 2\nname: 'a b'\n", "name: String should match pattern"),
        ("- 1\n", "not a mapping"),
        ("kind: [\n", "cannot read job spec"),
    ],
)  # fmt: skip
def test_bad_specs_are_refused_naming_the_key_and_the_file(tmp_path, text, expect):
    path = _spec(tmp_path, text)
    with pytest.raises(SettingsError) as caught:
        load_spec(path)
    assert expect in str(caught.value) and str(path) in str(caught.value)


def test_a_spec_with_several_mistakes_reports_every_one_naming_its_key_and_the_file(tmp_path):
    path = _spec(tmp_path, "kind: upscale\nsource: a\ndest: b\nscale: 5\nbogus_key: 1\ntile: 8\n")
    with pytest.raises(InvalidSettingsError) as caught:
        load_spec(path)
    error = caught.value
    assert error.summary == f"invalid job settings in {path}: 3 problems"
    assert error.problems == (
        f"{path}: scale: Input should be 2, 3 or 4",
        f"{path}: bogus_key: not a setting of upscale jobs",
        f"{path}: tile: tile 8 is out of range: use 0 (whole image) or at least 32 px "
        "(each tile also reads 24 px of context on every side)",
    )  # in the order of the file
    assert str(error).splitlines() == [error.summary, *error.problems]


def test_a_misspelt_required_key_is_named_as_unknown_and_as_missing(tmp_path):
    path = _spec(tmp_path, "kind: upscale\nsource: a\ndest: b\nscael: 2\n")
    with pytest.raises(InvalidSettingsError) as caught:
        load_spec(path)
    assert caught.value.problems == (
        f"{path}: scael: not a setting of upscale jobs (did you mean scale?)",
        f"{path}: scale is required (is scael a misspelling of it?)",
    )


def test_bad_set_items_are_reported_with_the_problems_of_the_spec(tmp_path):
    path = _spec(tmp_path, "kind: upscale\nsource: a\ndest: b\nbogus_key: 1\nschedule: nightly\n")
    with pytest.raises(InvalidSettingsError) as caught:
        load_spec(path, ["tile=8", "scael=2", "colour"])
    assert caught.value.summary == f"invalid job settings in {path}: 6 problems"
    assert caught.value.problems == (
        f"{path}: schedule: 'nightly' is not a cron line like '0 2 * * *'",
        "--set tile=8: tile: tile 8 is out of range: use 0 (whole image) or at least 32 px "
        "(each tile also reads 24 px of context on every side)",
        "--set scael=2: scael: not a setting of upscale jobs (did you mean scale?)",
        "--set 'colour': write key=value, e.g. --set scale=3",
        f"{path}: bogus_key: not a setting of upscale jobs",
        f"{path}: scale is required (is scael a misspelling of it?)",
    )
    # A refused --set stands for its key: the file's missing (or bad) value is not a second problem.
    with pytest.raises(InvalidSettingsError) as caught:
        load_spec(path, ["scale=9"])
    assert caught.value.problems[1:] == (
        "--set scale=9: scale: Input should be 2, 3 or 4",
        f"{path}: bogus_key: not a setting of upscale jobs",
    )


def test_flags_and_a_config_with_flags_report_every_problem(tmp_path):
    with pytest.raises(InvalidSettingsError) as caught:
        build_job(TrainJob, {"workers": 0})
    assert caught.value.summary == "invalid job settings: 4 problems"
    assert caught.value.problems == (
        "workers: Input should be greater than or equal to 1",
        "data is required (--data)",
        "scale is required (--scale)",
        "name is required (--name)",
    )
    path = _spec(tmp_path, "kind: upscale\nscael: 2\nwieghts: w.pth\n")
    with pytest.raises(InvalidSettingsError) as caught:
        UpscaleJob.from_yaml(path, source="s3://a/b", dest="s3://a/c", tile=64)
    assert caught.value.problems == (
        f"{path}: scael: not a setting of upscale jobs (did you mean scale?)",
        f"{path}: wieghts: not a setting of upscale jobs (did you mean weights?)",
        f"{path}: scale is required (is scael a misspelling of it?)",
    )


def test_set_overrides_parse_each_setting_by_its_type(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _spec(tmp_path, "kind: upscale\nsource: in\ndest: out\nscale: 2\nmax_error_fraction: 0.1\n")
    sets = ["scale=3", "tile=64", "overwrite=true", 'storage_options={"anon": true}', "weights=007",
            "max_error_fraction=null", "dest=s3://b/out", "png-compress-level=6"]  # fmt: skip
    job = load_spec(path, sets).job
    assert (job.scale, job.tile, job.overwrite, job.storage_options) == (3, 64, True, {"anon": True})
    assert job.weights == str(tmp_path / "007") and job.max_error_fraction is None
    assert (job.dest, job.source, job.png_compress_level) == ("s3://b/out", str(tmp_path / "in"), 6)
    for item, expect in [("tile=8", "at least 32"), ("scal=3", "did you mean scale?"), ("scale", "key=value"),
                         ("storage_options={", "not valid YAML")]:  # fmt: skip
        with pytest.raises(SettingsError, match=expect):
            load_spec(path, [item])


def test_tile_means_auto_or_whole_or_pixels_everywhere():
    for job_class in (UpscaleJob, EvalJob):
        assert job_class.model_fields["tile"].default == AUTO
    job = UpscaleJob(source="s3://a/b", dest="s3://a/c", scale=2, tile="0")
    assert job.tile == 0 and UpscaleJob(source="s3://a/b", dest="s3://a/c", scale=2, tile=48).tile == 48
    for bad in (None, 8, "whole", True):
        with pytest.raises(ValueError, match="tile"):
            UpscaleJob(source="s3://a/b", dest="s3://a/c", scale=2, tile=bad)


def test_upscaling_defaults_to_precision_auto_and_evaluation_to_fp32():
    """Pictures get the fastest precision of equal quality; the paper's figures are fp32 ones."""
    assert UpscaleJob(source="s3://a/b", dest="s3://a/c", scale=2).precision == AUTO
    assert EvalJob(data="a", scale=2).precision == "fp32"
    commands = build_parser()._subparsers._group_actions[0].choices
    for command, default in (("upscale", AUTO), ("upscale-image", AUTO), ("compare", AUTO), ("eval", "fp32")):
        (action,) = [a for a in commands[command]._actions if a.dest == "precision"]
        assert f"(default: {default})" in action.help, command


def test_eval_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = EvalJob(data=("a", "b", "./a"), scale=(3, 2, 3), weights="w/PANx{scale}.pth")
    # local paths are absolute (actors run elsewhere), repeats dropped; hub ids stay as they are
    assert job.data == (str(tmp_path / "a"), str(tmp_path / "b")) and job.scale == (3, 2)
    assert job.weights_for(3) == str(tmp_path / "w/PANx3.pth")
    assert EvalJob(data="someone/set5", scale=2).data == ("someone/set5",)
    assert EvalJob(data="a", scale=2).weights_for(2) == DEFAULT_WEIGHTS
    for bad, expect in [({"tile": 8}, "at least 32"), ({"data": ()}, "at least 1"),
                        ({"scale": 5}, "2, 3 or 4"), ({"precision": "fp8"}, "fp32"),
                        ({"actors": 0}, "greater than or equal to 1")]:  # fmt: skip
        with pytest.raises(ValueError, match=expect):
            EvalJob(**{"data": "a", "scale": 2, **bad})


def test_flags_are_derived_from_the_models():
    """Each job command has one flag per field, with the field's choices, default and help."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for kind, job_class in KINDS.items():
        actions = {a.dest: a for a in commands[kind]._actions}
        assert set(job_class.model_fields) <= set(actions), kind
        for name, field in job_class.model_fields.items():
            assert field.description and field.description.replace("%", "%%") in actions[name].help
    upscale = {a.dest: a for a in commands["upscale"]._actions}
    assert tuple(upscale["scale"].choices) == SCALES and tuple(upscale["precision"].choices) == (
        *PRECISIONS,
        AUTO,
    )
    assert (
        "(default: auto)" in upscale["tile"].help
        and f"(default: {DEFAULT_WEIGHTS})" in upscale["weights"].help
    )
    image = {a.dest: a for a in commands["upscale-image"]._actions}
    assert image["png_compress_level"].default == UpscaleJob.model_fields["png_compress_level"].default
    assert image["tile"].default == AUTO and image["scale"].required


def test_validate_prints_resolved_settings_and_fails_on_a_bad_spec(tmp_path, capsys):
    bad = _spec(tmp_path, "kind: train\ndata: a\nscale: 2\nname: x\nworkerz: 2\n")
    assert main(["validate", str(REPO / "jobs/nightly-upscale.yaml"), str(bad)]) == 2
    out, err = capsys.readouterr()
    settings = yaml.safe_load(out.split("\n", 1)[1])
    assert settings["kind"] == "upscale" and settings["tile"] == AUTO and settings["schedule"] == "0 2 * * *"
    expect = f"invalid job settings in {bad}: workerz: not a setting of train jobs (did you mean workers?)"
    assert err.strip() == f"pan: error: {expect}"


def test_run_refuses_a_bad_spec_before_anything_runs(tmp_path, capsys):
    path = _spec(tmp_path, "kind: upscale\nsource: in\ndest: out\nscale: 2\n")
    assert main(["run", str(path), "--set", "colour=red"]) == 2
    assert "--set colour=red: colour: not a setting of upscale jobs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_of_another_kind_is_refused(tmp_path, capsys):
    assert main(["upscale", "in", "out", "--config", str(REPO / "jobs/retrain-x2.yaml")]) == 2
    assert "is a 'train' job spec, not 'upscale'" in capsys.readouterr().err


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_the_retrain_specs_carry_the_papers_recipe(scale):
    """The authors' train_PANx{2,3,4}.yml (zhaohengyuan1/PAN): 64-px LR patches at every scale,
    batch 32, Adam at 7e-4, cosine restarts every 250k steps to 1e-7, 1M steps, Set5 every 5k,
    seed 10, no EMA; trained from scratch on the prepared DF2K of jobs/prepare-df2k.yaml."""
    job = load_spec(REPO / f"jobs/retrain-x{scale}.yaml").job
    prepare = load_spec(REPO / "jobs/prepare-df2k.yaml").job
    recipe = {"scale": scale, "batch_size": 32, "patch_size": 64, "lr": 7e-4, "min_lr": 1e-7,
              "restart_every": 250_000, "max_steps": 1_000_000, "val_every": 5000, "seed": 10,
              "ema_decay": None, "init_weights": None, "batch_per_worker": False}  # fmt: skip
    assert {key: getattr(job, key) for key in recipe} == recipe
    assert job.data == prepare.dest and scale in prepare.scale
    assert (prepare.crop_size, prepare.step) == (360, 180) and len(prepare.sources) == 2  # DIV2K + Flickr2K
    assert job.val_data.endswith("/Set5")
