"""Runs inside the vLLM virtual environment (driven by tests/test_vllm.py): greedy generation with `vllm.LLM`.

    python tests/vllm_worker.py JOB.json OUT.json

JOB: {"max_tokens": N, "tensor_parallel_size": 1, "checkpoints": [{"path": DIR, "requests": [{"prompt": str,
"images": [png paths]}], "batch": bool}]}. OUT: per checkpoint {"alone": [[token ids] per request], "batch":
[[token ids] ...] (requests in one generate call) or null, "prompt_ids": [[...]]}.

    python tests/vllm_worker.py --chat BASE_URL CHAT.json OUT.json

sends each chat request of CHAT.json ([{"messages": [...]}]) to vLLM's OpenAI server through the `openai` client, in
order; OUT: [{"text": str} or {"status": HTTP status, "error": message}].
"""

from __future__ import annotations

import gc
import json
import sys


def main(job_path: str, out_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    job = json.loads(open(job_path).read())
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)
    results = []
    for ckpt in job["checkpoints"]:
        llm = LLM(
            ckpt["path"],
            dtype="float32",
            max_model_len=512,
            max_num_seqs=8,
            seed=0,
            enforce_eager=True,
            tensor_parallel_size=job.get("tensor_parallel_size", 1),
        )
        inputs = []
        for req in ckpt["requests"]:
            item = {"prompt": req["prompt"]}
            if req["images"]:
                item["multi_modal_data"] = {"image": [Image.open(p).convert("RGB") for p in req["images"]]}
            inputs.append(item)
        alone = [llm.generate([item], params, use_tqdm=False)[0] for item in inputs]
        batch = llm.generate(inputs, params, use_tqdm=False) if ckpt.get("batch") else None
        results.append(
            {
                "alone": [list(o.outputs[0].token_ids) for o in alone],
                "prompt_ids": [list(o.prompt_token_ids) for o in alone],
                "batch": [list(o.outputs[0].token_ids) for o in batch] if batch else None,
            }
        )
        del llm
        gc.collect()
    open(out_path, "w").write(json.dumps(results))


def chat(base_url: str, chat_path: str, out_path: str) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    results = []
    for req in json.loads(open(chat_path).read()):
        try:
            reply = client.chat.completions.create(
                model=req["model"],
                messages=req["messages"],
                max_tokens=req["max_tokens"],
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            results.append({"text": reply.choices[0].message.content})
        except openai.APIStatusError as err:
            results.append({"status": err.status_code, "error": str(err)})
    open(out_path, "w").write(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "--chat":
        chat(*sys.argv[2:5])
    else:
        main(*sys.argv[1:3])
