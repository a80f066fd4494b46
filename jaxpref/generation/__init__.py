"""Text generation: KV-cached decoding (`engine`), the next-token rule (`sampling`), and prompts
as text or messages in and completions out (`text`). The command line is `jaxpref.generate`."""
