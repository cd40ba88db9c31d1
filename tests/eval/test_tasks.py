"""Task accuracy through lm-eval, both routes: in process (`slimlm eval --tasks`) and `lm-eval
--model local-completions` against `slimlm serve`, on a multiple-choice and a generation task
written here from local files; both give the same per-sample answers and the same accuracy."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models
pytest.importorskip("fastapi")


def write_tasks(folder):
    mc = [{"question": f"Item {i}: the loop", "choices": [" runs", " eats", " sleeps", " jumps"], "answer": i % 4}
          for i in range(10)]
    gen = [{"prompt": f"Count {i}, {i + 1},", "target": f" {i + 2}"} for i in range(6)]
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "slim_mc.yaml").write_text(f"""task: slim_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (folder / "slim_gen.yaml").write_text(f"""task: slim_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")


def test_in_process_and_served_evaluation_agree(tiny_folder, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    import slimlm
    from slimlm.eval.tasks import run_tasks
    from slimlm.server.app import ServeSettings
    from slimlm.server.server import BackgroundServer, build_app

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path)
    folder = tiny_folder("llama")
    model, tok = slimlm.load(folder)
    ours = run_tasks(model, tok, ["slim_mc", "slim_gen"], include_path=str(tmp_path))
    app, models = build_app(str(folder), ServeSettings(), slots=4, max_len=256)
    try:
        with BackgroundServer(app) as url:
            served = lm_eval.simple_evaluate(
                model="local-completions", tasks=["slim_mc", "slim_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
                model_args={"base_url": url + "/v1/completions", "model": next(iter(models)), "tokenizer": str(folder),
                            "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1},
                batch_size=4, log_samples=True, bootstrap_iters=0)
    finally:
        for m in models.values():
            m.scheduler.close()
    for task, metric in (("slim_mc", "acc"), ("slim_gen", "exact_match")):
        assert ours[task][metric] == served["results"][task][f"{metric},none"]
        mine = [s["filtered_resps"] for s in ours["samples"][task]]
        theirs = [s["filtered_resps"] for s in served["samples"][task]]
        assert len(mine) == len(theirs) > 0
        if task == "slim_mc":  # log-likelihoods: the same numbers up to float rounding
            for a, b in zip(mine, theirs):
                assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-4)
        else:
            assert mine == theirs


def test_unknown_tasks_are_a_clear_error(tiny_folder, tmp_path):
    import slimlm
    from slimlm.core.errors import SlimError
    from slimlm.eval.tasks import run_tasks

    model, tok = slimlm.load(tiny_folder("llama"))
    with pytest.raises(SlimError, match="no task 'no_such_task'"):
        run_tasks(model, tok, ["no_such_task"], include_path=str(tmp_path))


def test_slimlm_eval_tasks_on_the_command_line(tiny_folder, tmp_path, capsys, monkeypatch):
    from slimlm.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path)
    code = main(["eval", str(tiny_folder("llama")), "--tasks", "slim_mc", "--include-path", str(tmp_path),
                 "--limit", "4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and 0 <= out["slim_mc"]["acc"] <= 1
    code = main(["eval", str(tiny_folder("llama")), "--tasks", "nope", "--include-path", str(tmp_path)])
    assert code == 2 and "no task 'nope'" in capsys.readouterr().err
