"""Request handling behind the thin routes: completions, chat completions, tokenization."""
