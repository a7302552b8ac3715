"""How an OpenAI chat completion request becomes one RLM episode, and its answer a reply.

The question and the context (`split_chat`):

- `rlm.context` / `rlm.context_path` in the body (the openai client's `extra_body`): that is the
  context, and the last user message is the question.
- Otherwise the LAST user message is the question, and the messages before it (user, assistant
  and tool messages; their text joined by blank lines, each labelled with its role when not all
  are user messages) are the context: send the document as one message and the question as the
  next.
- A conversation of one user message is both: the whole message is the context, and the
  question too. A message longer than `QUESTION_CHARS` is shown to the root model as its first
  and last `QUESTION_EDGE_CHARS` characters with a note that the whole message is `context`
  ("Summarize the following:\n\n<doc>" and "<doc>\n\nWhat does it say about X?" both keep
  their instruction). Nothing is ever split at a blank line.

System and developer messages are instructions: they are put before the question.

Parameters (`check_parameters`): `max_tokens` / `max_completion_tokens` cut the answer to that
many tokens of the served model's tokenizer (finish_reason "length"; without a tokenizer they
are refused), `stop` cuts it before the first stop string, `temperature` is the root model's.
Sampling knobs that cannot change what an answer is (`top_p`, `seed`, ...: `IGNORED`) are
accepted and not used; everything else an OpenAI server would do differently (`tools`, `n` > 1,
`logprobs`, a `response_format` other than text, ...) is refused with 400 naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rlm_train.serve.gateway_api import GatewayError, RLMExtension

QUESTION_CHARS = 4000  # a lone message longer than this is shown to the root model by its two ends
QUESTION_EDGE_CHARS = 1500
MAX_STOP_STRINGS = 4  # OpenAI's limit

# Accepted and not used: they tune sampling, and the answer comes out of the RLM's code.
IGNORED = frozenset({
    "top_p", "frequency_penalty", "presence_penalty", "seed", "user", "metadata", "store", "service_tier",
    "reasoning_effort", "prompt_cache_key", "safety_identifier", "verbosity", "parallel_tool_calls",
    "top_k", "min_p", "repetition_penalty",
})


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: accepted, not used
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by check_parameters: IGNORED, or refused by name
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    rlm: RLMExtension | None = None

    @property
    def answer_tokens(self) -> int | None:
        """The answer's token limit: max_completion_tokens, else max_tokens (vLLM's order)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _unsupported(parameter: str, why: str) -> GatewayError:
    return GatewayError(400, f"{parameter}: {why}", "invalid_request_error")


def check_parameters(body: ChatRequest, has_tokenizer: bool) -> None:
    """400 naming the first parameter the gateway would not honour (module docstring)."""
    if body.tools:
        raise _unsupported("tools", "the gateway answers as an RLM and calls no client tools; leave `tools` out")
    if body.tool_choice not in (None, "none", "auto"):
        raise _unsupported("tool_choice", "the gateway calls no client tools; leave `tool_choice` out")
    if body.functions or body.function_call not in (None, "none", "auto"):
        raise _unsupported("functions" if body.functions else "function_call",
                           "the gateway calls no client functions; leave it out")
    if body.n > 1:
        raise _unsupported("n", f"the gateway runs one episode per request (n=1), not {body.n}; send {body.n} requests")
    if body.logprobs or body.top_logprobs:
        raise _unsupported("logprobs" if body.logprobs else "top_logprobs",
                           "the answer is what the RLM's code returns (FINAL), not one sampled text: no token "
                           "logprobs; leave it out")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise _unsupported("response_format", f"type {body.response_format.get('type')!r} is not supported: the "
                                              "answer is text (ask for JSON in the question instead)")
    if body.logit_bias:
        raise _unsupported("logit_bias", "not supported by the RLM gateway; leave it out")
    if len(body.stop_strings) > MAX_STOP_STRINGS or any(not s for s in body.stop_strings):
        raise _unsupported("stop", f"at most {MAX_STOP_STRINGS} non-empty strings")
    for name in body.model_extra or {}:
        if name not in IGNORED:
            raise _unsupported(name, "not a parameter this gateway supports (it takes model, messages, stream, "
                                     "stream_options, temperature, max_tokens / max_completion_tokens, stop, "
                                     "and `rlm` for the context and budgets)")
    if body.answer_tokens is not None and not has_tokenizer:
        which = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise _unsupported(which, "this gateway has no tokenizer to count the answer's tokens (it is in front of "
                                  "--base-url without gateway.tokenizer); leave it out, or start the gateway with "
                                  "gateway.tokenizer=MODEL_DIR")


# ---------------------------------------------------------------------------
# The question and the context


def _text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _unsupported(f"{where}.content[{j}]", f"parts of type {part.type!r} are not supported: the "
                                                         "gateway takes text only")
        texts.append(part.text)
    return "\n\n".join(texts)


def question_of_lone_message(text: str) -> str:
    """What the root model is asked when one message is both the question and the context."""
    if len(text) <= QUESTION_CHARS:
        return text
    left_out = len(text) - 2 * QUESTION_EDGE_CHARS
    return (f"{text[:QUESTION_EDGE_CHARS]}\n\n[... {left_out:,} characters of this message left out here; the "
            f"whole message ({len(text):,} characters) is the variable `context` ...]\n\n"
            f"{text[-QUESTION_EDGE_CHARS:]}")


def split_chat(messages: list[ChatMessage], explicit_context: bool) -> tuple[str, str | None]:
    """(question, context) of an OpenAI chat (module docstring). Context None: given in `rlm`."""
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None:
        raise _unsupported("messages", "no user message; the last user message is the question")
    if last != len(messages) - 1:
        raise _unsupported(f"messages[{len(messages) - 1}]", "the conversation must end with the user message that "
                                                           "asks the question (no assistant prefill, no tool results)")
    question = _text(messages[last].content, f"messages[{last}]").strip()
    if not question:
        raise _unsupported(f"messages[{last}]", "the last user message (the question) is empty")
    instructions = "\n\n".join(t for i, m in enumerate(messages) if m.role in ("system", "developer")
                               for t in [_text(m.content, f"messages[{i}]").strip()] if t)
    earlier = [(m.role, _text(m.content, f"messages[{i}]")) for i, m in enumerate(messages[:last])
               if m.role not in ("system", "developer")]
    earlier = [(role, text) for role, text in earlier if text.strip()]
    context: str | None
    if explicit_context:
        query, context = question, None
    elif earlier:
        labelled = any(role != "user" for role, _ in earlier)
        context = "\n\n".join(f"{role}: {text}" if labelled else text for role, text in earlier)
        query = question
    else:
        context, query = question, question_of_lone_message(question)
    if instructions:
        query = f"{instructions}\n\n{query}"
    return query, context


# ---------------------------------------------------------------------------
# The answer


def limit_answer(answer: str, stop: list[str], max_tokens: int | None, tokenizer: Any) -> tuple[str, bool]:
    """The answer cut before its first stop string, then to `max_tokens` tokens of `tokenizer`;
    also whether the token limit cut it (finish_reason "length")."""
    cuts = [answer.find(s) for s in stop if s in answer]
    if cuts:
        answer = answer[:min(cuts)]
    if max_tokens is None or tokenizer is None:
        return answer, False
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return answer, False
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True), True


def load_answer_tokenizer(spec: str) -> Any:
    """The tokenizer that counts answers' tokens (`gateway.tokenizer`): a UserError when it cannot load."""
    from rlm_train.errors import UserError
    from rlm_train.models import loading

    try:
        from transformers import AutoTokenizer

        given = Path(spec).expanduser()  # a directory of tokenizer files alone will do
        return AutoTokenizer.from_pretrained(given if given.is_dir() else loading.resolve_model(spec))
    except UserError as exc:
        raise UserError(f"gateway.tokenizer {spec}: {exc}") from None
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"gateway.tokenizer {spec}: cannot load a tokenizer from it ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a model directory with tokenizer "
                        "files") from None
