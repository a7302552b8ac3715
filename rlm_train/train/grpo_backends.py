"""Token generation for GRPO episodes: blocking backends (the trainer's model in-process, or a vLLM
server in TRL's server mode) behind an async front that batches the turns of concurrent episodes.

Generation is token-in/token-out: callers pass prompt ids and get sampled ids back."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from rlm_train.models.base import PolicyError, RequestRefused, SamplingParams

if TYPE_CHECKING:
    from rlm_train.train.grpo_config import GRPOConfig


@dataclass
class GenOutput:
    ids: list[int]
    logprobs: list[float] | None = None  # sampling logprob of each id (vLLM), None when not known


class SampledTokenLogprobs:
    """A generate() logits processor that applies the sampling temperature itself and keeps the
    log-probability of each drawn token under the distribution it was drawn from, so in-process
    rollouts report sampling logprobs as a vLLM server does (the importance-sampling correction
    compares them with the trainer's). It must be the last processor: generate() is called with
    temperature 1, top_k 0, top_p 1, so no warper runs after it. One step's log-softmax is held at
    a time; each token's value is read at the next step, once the token is known."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.last: Any = None  # log-softmax of the latest step [B, V]
        self.taken: list[Any] = []  # [B] per generated token

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores / self.temperature
        if self.last is not None:
            self.taken.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def per_token(self, new_ids: Any) -> list[list[float]]:
        """[B][n] logprobs of the generated ids [B, n] (generate may end a step after the last call)."""
        import torch

        n = new_ids.shape[1]
        taken = self.taken[:n]
        if len(taken) < n and self.last is not None:
            taken.append(self.last.gather(-1, new_ids[:, len(taken):len(taken) + 1]).squeeze(-1))
        return torch.stack(taken, dim=1).tolist() if taken else [[] for _ in range(new_ids.shape[0])]


class TransformersBackend:
    """Generates with the trainer's current model, in-process (CPU, or one GPU); sampled turns come back
    with their sampling logprobs (greedy ones without)."""

    max_inflight = 1  # one model instance: batches run one after another

    def __init__(self, trainer: Any, tokenizer: Any, stop_ids: list[int]):
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids

    def generate_batch(self, prompts: list[list[int]], sampling: SamplingParams) -> list[GenOutput]:
        import torch
        from transformers import LogitsProcessorList

        from rlm_train.train.trl_compat import unwrap_for_generation

        trainer = self.trainer
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": pad,
            "use_cache": True,
            "do_sample": sampling.temperature > 0,
        }
        recorder = None
        if sampling.temperature > 0:
            # Plain temperature sampling: TRL scores tokens with logits / temperature and nothing else.
            recorder = SampledTokenLogprobs(sampling.temperature)
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0, logits_processor=LogitsProcessorList([recorder]))
        with unwrap_for_generation(trainer) as model, torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs)
            finally:
                model.train(was_training)
        new = out[:, width:]
        logprobs = recorder.per_token(new) if recorder is not None else None
        results = []
        for i, row in enumerate(new.tolist()):
            cut = next((k + 1 for k, t in enumerate(row) if t in self.stop_ids), len(row))
            results.append(GenOutput(row[:cut], logprobs[i][:cut] if logprobs is not None else None))
        return results


class VLLMServerBackend:
    """Generates with a `vllm serve` process (TRL server mode; TRL pushes the weights before each rollout)."""

    max_inflight = 32  # the server batches concurrent requests itself

    def __init__(self, client: Any, stop_ids: list[int]):
        self.client = client  # trl.generation.vllm_client.VLLMClient or anything with its generate()
        self.stop_ids = stop_ids

    def generate_batch(self, prompts: list[list[int]], sampling: SamplingParams) -> list[GenOutput]:
        out = self.client.generate(
            prompts=prompts, n=1, temperature=sampling.temperature, top_p=1.0, top_k=0,
            max_tokens=sampling.max_tokens, logprobs=0,
            generation_kwargs={"stop_token_ids": list(self.stop_ids)},
        )
        logprobs = out.get("logprobs")
        results = []
        for i, ids in enumerate(out["completion_ids"]):
            lps = None
            if logprobs is not None:
                # Top-1 entry is the sampled token's logprob (None where vLLM had NaN).
                lps = [float("nan") if lp[0] is None else lp[0] for lp in logprobs[i]]
            results.append(GenOutput(list(ids), lps))
        return results


class BatchingGenerator:
    """Async front of a blocking backend: requests that arrive together (concurrent episodes' turns) go
    to the backend as one batch. `backend.max_inflight` batches run at once (1 for an in-process model,
    many for a server, so a slow batch does not hold up episodes that are ready). A backend failure
    fails the whole rollout, never a silent zero reward."""

    def __init__(self, backend: Any, wait_s: float = 0.02):
        self.backend = backend
        self.wait_s = wait_s
        self.pending: list[tuple[list[int], SamplingParams, asyncio.Future]] = []
        self.flusher: asyncio.Task | None = None
        self.slots: asyncio.Semaphore | None = None
        self.running: set[asyncio.Task] = set()
        self.fatal: BaseException | None = None
        self.calls = 0

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> GenOutput:
        if self.fatal is not None:
            raise PolicyError(f"generation backend failed: {self.fatal}")
        self._slots()  # created on the running loop
        future = asyncio.get_running_loop().create_future()
        self.pending.append((prompt_ids, sampling, future))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush())
        return await future

    def _slots(self) -> asyncio.Semaphore:
        if self.slots is None:
            self.slots = asyncio.Semaphore(getattr(self.backend, "max_inflight", 1))
        return self.slots

    async def _flush(self) -> None:
        slots = self._slots()
        while self.pending:
            await asyncio.sleep(self.wait_s)  # let the other episodes' turns join this batch
            await slots.acquire()  # while waiting here, more requests join the next batch
            batch, self.pending = self.pending, []
            groups: dict[tuple, list] = {}
            for item in batch:
                groups.setdefault((item[1].max_tokens, item[1].temperature), []).append(item)
            for i, items in enumerate(groups.values()):
                if i:  # the first group's slot is already held
                    await slots.acquire()
                task = asyncio.create_task(self._run(items))
                self.running.add(task)
                task.add_done_callback(self.running.discard)

    async def _run(self, items: list) -> None:
        try:
            outs = await asyncio.to_thread(self.backend.generate_batch, [p for p, _, _ in items], items[0][1])
            self.calls += 1
        except Exception as exc:  # noqa: BLE001 - the rollout re-raises it after the batch
            if refused_request(exc):  # one request refused (e.g. over the window): fail only it
                await self._one_by_one(items)
                return
            self._fail(items, exc)
            return
        finally:
            self._slots().release()
        for (_, _, fut), out in zip(items, outs):
            if not fut.done():
                fut.set_result(out)

    async def _one_by_one(self, items: list) -> None:
        """A batch the server refused: each request alone, so only the refused ones fail,
        as a model-side error their episodes record; the generator stays usable."""
        for item in items:
            prompt, sampling, fut = item
            try:
                out = (await asyncio.to_thread(self.backend.generate_batch, [prompt], sampling))[0]
                self.calls += 1
            except Exception as exc:  # noqa: BLE001
                if not refused_request(exc):
                    self._fail([item], exc)
                elif not fut.done():
                    fut.set_exception(RequestRefused(f"the generation server refused this request: {exc}"))
                continue
            if not fut.done():
                fut.set_result(out)

    def _fail(self, items: list, exc: BaseException) -> None:
        self.fatal = exc
        for _, _, fut in items:
            if not fut.done():
                fut.set_exception(PolicyError(f"generation backend failed: {exc}"))


def refused_request(exc: BaseException) -> bool:
    """A 4xx the server gave one request, not a backend that is broken."""
    from rlm_train.train.trl_compat import refused_by_server

    return isinstance(exc, RequestRefused) or refused_by_server(exc)


def default_backend_factory(cfg: GRPOConfig, tokenizer: Any, stop_ids: list[int]) -> Callable[[Any], Any]:
    """trainer -> the backend rollout.backend names (made once the trainer, whose model it uses, exists).
    `stop_ids` is the run's one stop set (grpo_setup.stop_token_ids), the same TRL counts truncation by."""

    def factory(trainer: Any) -> Any:
        if cfg.rollout.backend == "transformers":
            return TransformersBackend(trainer, tokenizer, stop_ids)
        from trl.generation.vllm_client import VLLMClient

        # A plain HTTP client per process; TRL's own client (main process) does the weight pushes.
        client = VLLMClient(base_url=cfg.rollout.vllm_server_url, connection_timeout=cfg.rollout.vllm_server_timeout_s)
        return VLLMServerBackend(client, stop_ids)

    return factory


def one_backend(factory: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`factory` called once, on first use: the rollouts and the held-out evaluation share one backend
    (one client per process, or the one in-process model)."""
    made: list[Any] = []

    def backend(trainer: Any) -> Any:
        if not made:
            made.append(factory(trainer))
        return made[0]

    return backend
