"""`python -m jaxpref.report` and the report `python -m jaxpref.train` writes: one row per model with
the values of its summary.json / metrics.jsonl / adapter_config.json, overlaid curves, base and
tuned samples side by side (those of samples.jsonl), failed models with their error."""
from __future__ import annotations

import json
import re

import pytest

from conftest import write_config
from jaxpref import report, train


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_llama, tiny_pairs):
    tmp = tmp_path_factory.mktemp("report")
    cfg = write_config(tmp / "c.yaml", tiny_llama, tiny_pairs,
                       models=[{"name": "a", "huggingface_id": str(tiny_llama)},
                               {"name": "broken", "huggingface_id": str(tmp / "nope")},
                               {"name": "b", "huggingface_id": str(tiny_llama)}],
                       dataset={"name": str(tiny_pairs), "eval_fraction": 0.25},
                       training={"max_steps": 2, "eval_steps": 1, "per_device_eval_batch_size": 2},
                       logging={"report_to": [], "progress_bar": False, "sample_prompts": 2,
                                "sample_max_new_tokens": 4})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp / "out")]) == 2   # `broken` failed
    return tmp / "out"


def trl_default_loss() -> str:
    from trl import DPOConfig

    lt = DPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False).loss_type
    return lt[0] if isinstance(lt, list) else lt


def md_table(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [l for l in section.splitlines() if l.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", l)[1:-1]] for l in lines[:1] + lines[2:]]


def test_report_files_written(two_models):
    for name in ("report.md", "report.html", "report_curves.png"):
        assert (two_models / name).is_file(), name
    assert (two_models / "report_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (two_models / "report.html").read_text()
    # self-contained: the plot is embedded, nothing is fetched
    assert "data:image/png;base64," in page
    assert not re.search(r"(src|href)=['\"](?!data:)", page)


def test_one_row_per_model_with_its_values(two_models):
    md = (two_models / "report.md").read_text()
    assert "2/3 model(s) trained." in md
    header, *rows = md_table(md, "Models")
    assert list(header) == list(report.COLUMNS)
    assert [r[0] for r in rows] == ["a", "b"]
    for r in rows:
        cell = dict(zip(header, r))
        run = two_models / r[0]
        summary = json.loads((run / "summary.json").read_text())
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
        last = [m for m in metrics if "loss" in m][-1]
        # the loss the run trained with, named as TRL's DPOConfig names its default
        assert cell["steps"] == "2" and cell["method (loss)"] == f"dpo ({trl_default_loss()})"
        assert cell["LoRA r / alpha / targets"] == "4 / 8 / q_proj, v_proj" == \
            f"{adapter['r']} / {adapter['lora_alpha']:g} / {', '.join(sorted(adapter['target_modules']))}"
        assert float(cell["train loss"]) == pytest.approx(last["loss"], rel=1e-3)
        assert float(cell["eval loss"]) == pytest.approx(summary["final_eval"]["eval_loss"], rel=1e-3)
        acc_train, acc_eval = cell["reward acc (train / eval)"].split(" / ")
        assert float(acc_train) == pytest.approx(last["rewards/accuracies"], abs=1e-3)
        assert float(acc_eval) == pytest.approx(summary["final_eval"]["eval_rewards/accuracies"], abs=1e-3)
        assert float(cell["wall s"]) == pytest.approx(summary["wall_time_s"], rel=1e-3)
        assert float(cell["peak host MiB"]) == pytest.approx(summary["peak_memory"]["host_rss_mib"], rel=1e-3)
        assert cell["tokens/s"] != "-" and cell["compile s"] != "-"


def test_samples_side_by_side(two_models):
    md = (two_models / "report.md").read_text()
    header, *rows = md_table(md, "Samples")
    assert header[0] == "prompt" and header[1].startswith("base: ") and header[2:] == ["a (step 2)", "b (step 2)"]
    a = [json.loads(l) for l in (two_models / "a" / "samples.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (two_models / "b" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for i, row in enumerate(rows):
        base_a = [x for x in a if x["model"] == "base"][i]
        assert row[0] == base_a["prompt"]
        assert row[1] == " ".join(base_a["completion"].split())
        assert row[2] == " ".join([x for x in a if x["step"] == 2][i]["completion"].split())
        assert row[3] == " ".join([x for x in b if x["step"] == 2][i]["completion"].split())


def test_failed_model_listed_with_its_error(two_models):
    md = (two_models / "report.md").read_text()
    failed = md.split("## Failed\n", 1)[1]
    assert failed.strip().startswith("- `broken`: ") and "not found" in failed
    assert "broken" in (two_models / "report.html").read_text()


def test_a_refused_rerun_keeps_the_finished_run_in_the_report(two_models, tmp_path):
    """Training the same config again without --resume is refused and changes nothing: the report
    still shows the finished runs, and lists the refusal beside them."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(two_models, out)
    refusal = "out/a already holds a run (adapter/); --resume continues it"
    report.write_report(out, ["a", "broken", "b"], {"a": refusal, "broken": "model not found"})
    md = (out / "report.md").read_text()
    assert "2/3 model(s) trained." in md
    assert [r[0] for r in md_table(md, "Models")[1:]] == ["a", "b"]
    failed = md.split("## Failed\n", 1)[1].strip().splitlines()
    assert failed == ["- `broken`: model not found",
                      f"- `a`: {refusal} (its folder still holds the finished run above)"]


def test_report_cli_rewrites_the_same_report(two_models, capsys):
    before = (two_models / "report.md").read_text()
    assert report.main([str(two_models)]) == 0
    after = (two_models / "report.md").read_text()
    # the standalone report reads the run folders: the same rows; `broken` never had a folder
    assert md_table(after, "Models") == md_table(before, "Models")
    assert md_table(after, "Samples") == md_table(before, "Samples")
    assert capsys.readouterr().out.strip().endswith("report.html")


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "is not a folder"),
    (lambda p: p, "holds no run folder"),
])
def test_report_cli_bad_folder_is_one_line(tmp_path, capsys, make, message):
    assert report.main([str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("files", [
    {"config.yaml": "- 1\n"},
    {"config.yaml": "models: 5\npost_training: [1]\nlora: x\n"},
    {"config.yaml": "models: [x]\n"},
    {"summary.json": "[1]"},
    {"summary.json": '{"final_eval": 3, "peak_memory": [1]}'},
    {"adapter/adapter_config.json": "[1]"},
    {"adapter/adapter_config.json": '{"r": 4, "target_modules": 7}'},
    {"samples.jsonl": '{"model": "base", "step": 0}\n{"model": "tuned", "prompt": 5, "completion": "x", "step": 1}\n'},
    {"error.log": b"\xff\xfe oops\n", "FINISHED": None},
])
def test_report_reads_a_hand_edited_run_record(tmp_path, capsys, files):
    """A run folder's records of another shape than the run wrote (edited by hand, another
    tool's) were AttributeError / KeyError / UnicodeDecodeError tracebacks; the row is written
    with what can be read."""
    run = tmp_path / "m"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("models: [{huggingface_id: some/base}]\npost_training: {method: dpo}\n")
    (run / "FINISHED").write_text("")
    for name, content in files.items():
        if content is None:
            (run / name).unlink()
        else:
            (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert report.main([str(tmp_path)]) == 0, capsys.readouterr().err
    text = (tmp_path / "report.md").read_text()
    if (run / "FINISHED").is_file():
        assert [r[0] for r in md_table(text, "Models")[1:]] == ["m"]
    else:   # listed with the last line of its error.log
        assert "- `m`: " in text and "oops" in text


@pytest.mark.parametrize("name", ["report.md", "report.html", "report_curves.png"])
def test_a_users_file_of_a_report_name_is_never_replaced(tmp_path, capsys, name):
    """`train --output-dir` into a folder holding the user's own report.md (or .html, or a
    folder of that name) replaced it with the report."""
    run = tmp_path / "m"
    run.mkdir()
    (run / "config.yaml").write_text("models: [{huggingface_id: some/base}]\n")
    (run / "FINISHED").write_text("")
    (tmp_path / name).write_text("my own notes\n")
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0] and "not a report of jaxpref's" in err[0], err
    train.write_report(tmp_path, ["m"], {}, quiet=False)   # the end of a run: a warning, never a failure
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxpref: warning: report not written") and name in err[0], err
    assert (tmp_path / name).read_text() == "my own notes\n"
    assert not {"report.md", "report.html", "report_curves.png"} - {name} & {p.name for p in tmp_path.iterdir()}
    (tmp_path / name).unlink()
    assert report.main([str(tmp_path)]) == 0   # our own report is rewritten each time
    assert report.main([str(tmp_path)]) == 0


def test_report_cli_still_lists_a_model_refused_for_bad_input(two_models, tmp_path, capsys):
    """`broken` failed on a bad input (its model source): `train` leaves its one-line error in
    `broken/error.log`, so the standalone report lists it as the run's report did. Before, its
    folder was left empty and `jaxpref report` said "2/2 model(s) trained", the failure gone."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(two_models, out)
    assert report.main([str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "2/3 model(s) trained." in md
    failed = md.split("## Failed\n", 1)[1].strip().splitlines()
    assert len(failed) == 1 and failed[0].startswith("- `broken`: model source ") and "not found" in failed[0]
    assert md == (two_models / "report.md").read_text()   # the same report as train wrote
