"""EleutherAI's lm-evaluation-harness on a model evaluation has loaded (opt-in: evaluate.lm_eval)."""

from __future__ import annotations

from pathlib import Path


def run_lm_eval(model, tokenizer, settings: dict, batch_size: int) -> dict:
    """EleutherAI's lm-evaluation-harness on one loaded model (opt-in: evaluate.lm_eval.tasks).

    The harness's own HFLM wraps the model object Kiln already loaded (no second load, and the
    merged model is scored as saved); tasks come from the harness's registry or, offline, from
    task YAML files under `include_path`. Returns {task: {metric: value}} from its results.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RuntimeError(
            f"evaluate.lm_eval.tasks needs lm-evaluation-harness ({exc}): pip install -e '.[lm-eval]'"
        ) from None
    include = settings.get("include_path") or None
    manager = TaskManager(include_path=str(Path(include).resolve()) if include else None)
    unknown = [t for t in settings["tasks"] if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include}" if include else " (set evaluate.lm_eval.include_path for your own task files)"
        raise ValueError(
            f"evaluate.lm_eval.tasks: {unknown[0]!r} is not a task of lm-eval {lm_eval.__version__}{where}"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(settings["tasks"]),
        num_fewshot=settings.get("num_fewshot") or None,
        limit=settings.get("limit") or None,
        task_manager=manager,
        bootstrap_iters=0,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    return {
        task: {k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "alias"}
        for task, values in out["results"].items()
    }
