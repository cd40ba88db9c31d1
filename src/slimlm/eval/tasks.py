"""Task accuracy through the lm-evaluation-harness (`pip install 'slimlm[eval]'`): perplexity hides
task-level losses, so a compressed model is also scored on the harness's tasks.

Two routes give the same numbers:
- in process, `run_tasks(model, tokenizer, tasks)` (`slimlm eval MODEL --tasks ...`): `SlimLM`, an
  lm-eval model over the loaded (compressed) model. Log-likelihoods come from the model's forward,
  generation from slimlm's engine (greedy, stopping at the task's strings);
- over HTTP, `lm-eval --model local-completions --model_args base_url=URL/v1/completions,model=NAME,
  tokenizer=FOLDER,tokenizer_backend=huggingface` against `slimlm serve` (scoring through `echo` +
  `logprobs`, prompts batched).
Both tokenize as lm-eval's API models do (the Hugging Face tokenizer, no special tokens added), so
the same requests reach the model. Tasks come from lm-eval's registry or from YAML files in
`include_path` (local data files: nothing is downloaded when HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.core.errors import SlimError


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise SlimError("task evaluation needs the lm-evaluation-harness: pip install 'slimlm[eval]'") from None
    return lm_eval, TemplateLM


def slim_lm(model: nn.Module, tokenizer, max_length: int | None = None):
    """An lm-eval model (`TemplateLM`) over `model`."""
    from slimlm.core.layers import context_length

    _, TemplateLM = _lm_eval()

    class SlimLM(TemplateLM):
        backend = "causal"

        def __init__(self) -> None:
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self.max_length = max_length or context_length(model) or 2048

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.eot_token_id

        def tok_encode(self, string: str, add_special_tokens: bool = False, **kwargs) -> list[int]:
            return self.tokenizer(string, add_special_tokens=add_special_tokens, return_attention_mask=False).input_ids

        def _token_logprobs(self, ids: list[int]) -> torch.Tensor:
            """(T-1, V) log-probabilities of each next token of ids."""
            device = next(self.model.parameters()).device
            with torch.no_grad():
                return self.model(torch.tensor([ids], device=device)).logits[0, :-1].float().log_softmax(-1)

        def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
            out = []
            for _, context, continuation in requests:
                ids = (context + continuation)[-self.max_length:]
                n = len(continuation)
                logprobs = self._token_logprobs(ids)[-n:]  # the continuation's positions
                target = torch.tensor(ids[-n:], device=logprobs.device)
                chosen = logprobs.gather(-1, target[:, None])[:, 0]
                greedy = bool((chosen >= logprobs.max(-1).values).all())
                out.append((float(chosen.sum()), greedy))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            out = []
            for (text,) in [r.args for r in requests]:
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1))
                total = 0.0
                for context, continuation in windows:
                    total += self._loglikelihood_tokens([(None, context, continuation)])[0][0]
                out.append(total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            from slimlm.engine.generate import generate_ids
            from slimlm.engine.sampling import SamplingParams

            out = []
            for context, settings in [r.args for r in requests]:
                until = settings.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = self.tok_encode(context)
                new = int(settings.get("max_gen_toks", 256))
                ids = ids[-(self.max_length - new - 1):]
                eos = self.eot_token_id
                params = SamplingParams(max_new_tokens=new, stop_ids=(eos,) if eos is not None else ())
                tokens = generate_ids(self.model, torch.tensor([ids]), params)[0].tolist()
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min((text.find(s) for s in until if s and s in text), default=-1)
                out.append(text[:cut] if cut >= 0 else text)
            return out

    return SlimLM()


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], include_path: str | None = None,
              limit: int | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
    """lm-eval's results for `tasks` on `model`: {task: {metric: value}} (plus the raw samples under
    'samples'). SlimError for an unknown task."""
    lm_eval, _ = _lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SlimError(f"lm-eval knows no task {unknown[0]!r}; name one of its tasks or give --include-path with "
                        "the task's YAML")
    results = lm_eval.simple_evaluate(model=slim_lm(model, tokenizer), tasks=tasks, task_manager=manager,
                                      limit=limit, num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0)
    metrics = {task: {k.split(",")[0]: v for k, v in values.items() if k != "alias" and not k.startswith("sample")}
               for task, values in results["results"].items()}
    return {**metrics, "samples": results.get("samples", {})}
