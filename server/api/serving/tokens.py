"""POST /tokenize and /detokenize: the exact token ids generation would see, and back."""
from __future__ import annotations

from server.api.errors import APIError
from server.api.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.api.serving.base import Serving


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
