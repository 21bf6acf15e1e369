"""`python -m dynamic_llava.serve.cli --model-path P --image-file F`: a multi-turn chat about an image in the
terminal (LLaVA's `serve.cli`), sparsified.

The KV cache is kept across turns (`generation.Session`): a turn prefills only its new tokens (the
template text closing the last answer, the new question, the opening of the next answer) at their true
positions after the cached conversation, instead of re-encoding everything. The conversation the model
sees is therefore the cached token ids: the answers exactly as generated. Earlier keep / drop decisions
stand (image tokens dropped in turn 1 stay dropped). Reads questions until EOF or an empty line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable

import torch
from PIL import Image

from ..conversation import Conversation, get_conv_template, stop_string
from ..errors import UserError, run_command
from ..generation import GenerationConfig, GenerationResult, Session, expanded_length, stream_generate
from ..mm_utils import get_model_name_from_path, load_image, tokenizer_image_token
from ..model_options import add_device_arguments, load_model
from ..prompting import ASSISTANT, USER, Turn, encode_prompt, image_query, infer_conv_mode, render_conversation
from ..sparsity_options import add_sparsity_arguments


class Chat:
    """One conversation about (optionally) one image, with its KV cache kept between turns."""

    def __init__(self, model, tokenizer, image_processor, conv_mode: str, image: Image.Image | None,
                 config: GenerationConfig) -> None:
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.conv_mode = conv_mode
        self.turns: list[Turn] = []  # the conversation so far, answers as recorded (stripped)
        self.image = image
        self.config = dataclasses.replace(config, stop_strings=[*config.stop_strings, stop_string(self.conv)])
        self.session = Session()
        self._prompt = ""  # the rendered conversation up to the open answer of the last turn
        self._answer = ""  # that answer as the conversation records it (stripped)
        self._finish = ""

    @property
    def conv(self) -> Conversation:
        return render_conversation(self.conv_mode, self.turns)

    @property
    def roles(self) -> tuple[str, str]:
        return self.conv.roles

    def next_input(self, text: str) -> tuple[list[Turn], torch.Tensor, torch.Tensor | None]:
        """The conversation's turns with `text` asked, and the token ids (and pixels) the turn prefills."""
        first = not self.turns
        if first and self.image is not None:
            text = image_query(text, 1, self.model.config.mm_use_im_start_end)
        turns = [*self.turns, (USER, text), (ASSISTANT, None)]
        prompt = render_conversation(self.conv_mode, turns).get_prompt()
        if first:
            images = [self.image] if self.image is not None else []
            return turns, *encode_prompt(prompt, images, self.tokenizer, self.image_processor, self.model.config)
        # What follows the cached answer: e.g. "</s>USER: <text> ASSISTANT:" for the v1 templates.
        rest = prompt[len(self._prompt):]
        new_text = rest[rest.find(self._answer) + len(self._answer):]
        ids = tokenizer_image_token(new_text, self.tokenizer)
        if ids[:1] == [self.tokenizer.bos_token_id]:
            ids = ids[1:]
        if self._finish == "length":  # the last sampled token is part of the answer but not yet in the cache
            ids = [self.session.last_token, *ids]
        return turns, torch.tensor(ids, dtype=torch.long), None

    def reply(self, text: str, on_text: Callable[[str], None] = lambda _: None) -> GenerationResult:
        """Answer `text`, passing the answer's text to `on_text` as it is generated."""
        turns, ids, pixels = self.next_input(text)
        room = self.model.config.max_position_embeddings - self.session.next_position - expanded_length(self.model, ids)
        if room < 1:
            raise UserError("the conversation has reached the model's context length; start a new chat")
        config = dataclasses.replace(self.config, max_new_tokens=min(self.config.max_new_tokens, room))
        stream = stream_generate(self.model, self.tokenizer, [ids], [pixels], config, session=self.session)
        for deltas in stream:
            on_text(deltas[0])
        result = stream.results[0]
        self._prompt = render_conversation(self.conv_mode, turns).get_prompt()
        self._answer = result.text.strip()
        self._finish = result.finish_reason
        self.turns = [*turns[:-1], (ASSISTANT, self._answer)]
        return result


def _stats_line(result: GenerationResult) -> str:
    kept = f"image tokens kept {result.image_tokens_kept}/{result.image_tokens}, " if result.image_tokens else ""
    return (f"[{result.prompt_tokens} new tokens prefilled after {result.context_tokens} cached; {kept}"
            f"generated tokens kept {result.output_tokens_kept}/{max(result.output_tokens - 1, 0)}; "
            f"KV cache {result.kv_cache_bytes} B (dense {result.kv_cache_bytes_dense} B)]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.serve.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="checkpoint folder (LLaVA, llava-hf or Dynamic-LLaVA)")
    parser.add_argument("--model-base", default=None, help="base LLM for LoRA / projector-only checkpoints")
    parser.add_argument("--image-file", default=None, help="the image to talk about (a path)")
    parser.add_argument("--conv-mode", default=None, help="template (default: inferred from the model name)")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    add_device_arguments(parser)
    add_sparsity_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature).validate()
    conv_mode = args.conv_mode or infer_conv_mode(get_model_name_from_path(args.model_path))
    get_conv_template(conv_mode)
    image = load_image(args.image_file) if args.image_file else None
    tokenizer, model, image_processor = load_model(args)
    chat = Chat(model, tokenizer, image_processor, conv_mode, image,
                GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature))
    user, assistant = chat.roles
    while True:
        try:
            text = input(f"{user.strip() or 'USER'}: ")
        except EOFError:
            print()
            break
        if not text.strip():
            break
        print(f"{assistant.strip() or 'ASSISTANT'}: ", end="", flush=True)
        result = chat.reply(text, on_text=lambda delta: print(delta, end="", flush=True))
        print()
        print(_stats_line(result), file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
