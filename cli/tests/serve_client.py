"""The `openai` package against `tandem serve`: whole and streamed replies
agree, on both endpoints, and an unknown model is a NotFoundError.

Usage: serve_client.py BASE_URL MODEL
"""
import sys

import openai


def main(base, model):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    ask = dict(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    whole = client.chat.completions.create(**ask)
    text = whole.choices[0].message.content
    assert "Paris" in text, text
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0, whole.usage

    pieces, finish = [], None
    for chunk in client.chat.completions.create(**ask, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == text, (pieces, text)
    assert finish == whole.choices[0].finish_reason, finish

    complete = dict(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    plain = client.completions.create(**complete).choices[0]
    assert plain.text and plain.finish_reason == "length", plain
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(**complete, stream=True) if c.choices
    )
    assert streamed == plain.text, (streamed, plain.text)

    try:
        client.chat.completions.create(**dict(ask, model="no-such-model"))
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError:
        pass
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
