"""POST /tokenize and /detokenize: the exact token ids generation would see, and back;
GET /tokenizer_info: the special tokens and chat template, for clients that tokenize remotely."""
from __future__ import annotations

from server.api.errors import APIError
from server.api.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse,
                                 TokenizerInfoResponse)
from server.api.serving.base import Serving
from server.api.serving.logprobs import token_text


class TokenServing(Serving):
    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """A prompt as /v1/completions encodes it; messages as /v1/chat/completions does."""
        self.check_model(body.model)
        if body.messages is not None:
            ids = await self.chat_prompt_ids(body.messages)
        else:
            ids = await self.encode(body.prompt, body.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids))

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        self.check_token_ids(body.tokens, "tokens")
        try:
            return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))
        except ValueError as error:
            raise APIError(400, str(error), param="tokens") from error

    def tokenizer_info(self) -> TokenizerInfoResponse:
        """Special tokens as text: /tokenize encodes each back to its one id."""
        tokenizer = self.tokenizer
        return TokenizerInfoResponse(
            tokenizer_class=type(tokenizer).__name__, bos_token=self._token_text(tokenizer.bos_token_id),
            eos_token=self._token_text(tokenizer.eos_token_id), add_bos_token=tokenizer.add_bos_token,
            chat_template=tokenizer.chat_template, vocab_size=self.vocab_size, model_max_length=self.max_model_len)

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else token_text(self.tokenizer, token_id)
