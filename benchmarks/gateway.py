"""Latency the gateway adds over calling inference directly, at 1 and 32 concurrent episodes. Prints one
JSON object.

    python benchmarks/gateway.py [--quick] [--engine scripted|vllm] [--out FILE]

Three processes: an inference replica, the gateway service (`forgerl.services.gateway.main`, as deployed)
and this client. Each episode is an agent loop of `turns` tool-calling turns: a ~300-token system prompt
and task, then per turn a ~64-token generation (reasoning, content, one tool call, end of turn) and a tool
result of ~120 tokens, so every turn exercises history matching, rendering of the new messages, parsing
and recording.
- "direct": the same episodes without the gateway: the client holds the token history itself (prompt =
  previous prompt + generated ids + closing + rendered tool result, computed before the clock starts)
  and calls InferenceService.Generate;
- "gateway": the agent calls POST /v1/chat/completions over HTTP (httpx, keep-alive) with its message
  history, non-streaming ("plain": latency to the whole response) and streaming ("stream": latency to
  the first content-bearing event and to the end).
added = gateway percentile - direct percentile, in milliseconds.

The default engine is scripted (`forgerl.gateway.testing`: the real InferenceService gRPC API answering
every request with fixed token ids, streamed one token per message as vLLM does), which isolates the
gateway's own cost from generation time; `--engine vllm` serves a debug checkpoint of forgerl.model on
vLLM's CPU engine instead (generation dominates there and the numbers are noisier).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx

from forgerl.gateway.chat import ChatFormat, parse_messages
from forgerl.model.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from forgerl.runtime.client import health_status
from forgerl.runtime.testing import free_port
from forgerl.v1 import gateway_pb2, gateway_pb2_grpc, inference_pb2, inference_pb2_grpc

TOOL = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Run a bash command and return its output",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
    },
}
SYSTEM = (
    "You are a software engineering agent. You work in a repository checked out in the current directory. "
    "Use the bash tool to inspect files, run tests and edit code. Think before each action, keep actions "
    "small, and verify every change by running the relevant tests. "
) * 3
TASK = "The test suite fails on test_parse_dates with a timezone error. Find the cause and fix it."
TOOL_RESULT = "total 48\n" + "".join(
    f"-rw-r--r-- 1 dev dev {1000 + i * 37} Nov 22 08:{i:02d} module_{i}.py\n" for i in range(12)
)
GENERATION = (
    "<think>\nThe failing test mentions timezones; list the files, then read the date parsing module and its "
    "tests before changing anything.\n</think>\n\nLooking at the repository first.\n<tool_call>\n"
    '{"name": "bash", "arguments": {"command": "ls -la && grep -rn parse_dates ."}}\n</tool_call>'
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 0.5), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
    }


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path):
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_serving(address: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(proc.args)} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")  # type: ignore[arg-type]
        if health_status(address) == "SERVING":
            return
        time.sleep(0.2)
    raise RuntimeError(f"{address} did not report SERVING within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


class Episode:
    """The token history a direct client keeps, turn by turn (what the gateway would compute)."""

    def __init__(self, fmt: ChatFormat, generation: list[int]) -> None:
        self.fmt = fmt
        self.generation = generation
        messages = parse_messages([{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}])
        from forgerl.gateway.chat import Tools

        tools = Tools.parse([TOOL])
        self.prompt = fmt.prompt_ids(messages, tools)
        # What the template adds for a tool result after a reply: the same after every reply in ChatML.
        history = [*messages, *parse_messages([{"role": "assistant", "content": "ok"}])]
        tool = parse_messages([{"role": "tool", "tool_call_id": "x", "content": TOOL_RESULT}])
        self.tool_ids = fmt.suffix_ids(history, tool, tools)

    def next_prompt(self, generated: list[int]) -> None:
        self.prompt = [*self.prompt, *generated, *self.fmt.closing_ids(generated), *self.tool_ids]


async def direct_episode(
    stub: inference_pb2_grpc.InferenceServiceStub, fmt: ChatFormat, turns: int, max_tokens: int, eos: int, tag: str
) -> list[float]:
    episode = Episode(fmt, [])
    latencies = []
    for turn in range(turns):
        request = inference_pb2.GenerateRequest(
            request_id=f"direct-{tag}-{turn}",
            prompt_token_ids=episode.prompt,
            sampling=inference_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=[eos]),
        )
        generated: list[int] = []
        start = time.perf_counter()
        async for response in stub.Generate(request):
            generated += response.token_ids
        latencies.append(time.perf_counter() - start)
        episode.next_prompt(generated)
    return latencies


async def gateway_episode(
    admin: gateway_pb2_grpc.GatewayServiceStub, http: httpx.AsyncClient, turns: int, max_tokens: int, stream: bool
) -> tuple[list[float], list[float]]:
    opened = await admin.OpenEpisode(gateway_pb2.OpenEpisodeRequest(run_id="bench", task_id="t"))
    url = opened.base_url + "/chat/completions"
    headers = {"Authorization": f"Bearer {opened.episode_key}"}
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
    totals, firsts = [], []
    for _ in range(turns):
        body = {
            "model": "forgerl",
            "messages": messages,
            "tools": [TOOL],
            "temperature": 0.0,
            "max_tokens": max_tokens,
            "stream": stream,
        }
        start = time.perf_counter()
        if not stream:
            response = await http.post(url, json=body, headers=headers)
            totals.append(time.perf_counter() - start)
            response.raise_for_status()
            message = response.json()["choices"][0]["message"]
        else:
            message = {"role": "assistant", "content": ""}
            calls: list[dict[str, Any]] = []
            first = None
            async with http.stream("POST", url, json=body, headers=headers) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    delta = event["choices"][0]["delta"] if event.get("choices") else {}
                    if first is None and (delta.get("reasoning_content") or delta.get("content")):
                        first = time.perf_counter() - start
                    message["content"] += delta.get("content") or ""
                    calls += delta.get("tool_calls") or []
            totals.append(time.perf_counter() - start)
            firsts.append(first if first is not None else totals[-1])
            if calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        message.pop("reasoning_content", None)
        messages.append(message)
        for call in message.get("tool_calls") or []:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": TOOL_RESULT})
        if not message.get("tool_calls"):  # an untrained model: feed the result back as a user message
            messages.append({"role": "user", "content": TOOL_RESULT})
    await admin.CloseEpisode(gateway_pb2.CloseEpisodeRequest(episode_key=opened.episode_key))
    return totals, firsts


async def measure(args: argparse.Namespace, inference: str, gateway: str, fmt: ChatFormat, eos: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    # TCP_NODELAY: httpcore writes headers and body separately; with Nagle's algorithm the body waits for
    # the server's delayed ACK (~40 ms on Linux), which is the client's cost, not the gateway's.
    transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    async with (
        grpc.aio.insecure_channel(inference) as ichan,
        grpc.aio.insecure_channel(gateway) as gchan,
        httpx.AsyncClient(transport=transport, timeout=300) as http,
    ):
        stub = inference_pb2_grpc.InferenceServiceStub(ichan)
        admin = gateway_pb2_grpc.GatewayServiceStub(gchan)
        # warm-up: connections, caches, the gateway's first render
        await direct_episode(stub, fmt, 2, args.max_tokens, eos, "warm")
        await gateway_episode(admin, http, 2, args.max_tokens, False)
        await gateway_episode(admin, http, 2, args.max_tokens, True)
        for concurrency in args.concurrency:
            rounds = args.rounds_1 if concurrency == 1 else args.rounds
            direct: list[float] = []
            plain: list[float] = []
            stream_total: list[float] = []
            stream_first: list[float] = []
            for r in range(rounds):
                got = await asyncio.gather(
                    *(
                        direct_episode(stub, fmt, args.turns, args.max_tokens, eos, f"{concurrency}-{r}-{i}")
                        for i in range(concurrency)
                    )
                )
                direct += [x for lat in got for x in lat]
                got2 = await asyncio.gather(
                    *(gateway_episode(admin, http, args.turns, args.max_tokens, False) for _ in range(concurrency))
                )
                plain += [x for totals, _ in got2 for x in totals]
                got3 = await asyncio.gather(
                    *(gateway_episode(admin, http, args.turns, args.max_tokens, True) for _ in range(concurrency))
                )
                stream_total += [x for totals, _ in got3 for x in totals]
                stream_first += [x for _, firsts in got3 for x in firsts]
            d, p, s = summary(direct), summary(plain), summary(stream_total)
            results[f"concurrency_{concurrency}"] = {
                "episodes": concurrency * rounds,
                "turns_per_episode": args.turns,
                "direct": d,
                "gateway_plain": p,
                "gateway_stream": s,
                "gateway_stream_first_token": summary(stream_first),
                "added_plain_ms": {
                    "p50": round(p["p50_ms"] - d["p50_ms"], 3),
                    "p99": round(p["p99_ms"] - d["p99_ms"], 3),
                },
                "added_stream_ms": {
                    "p50": round(s["p50_ms"] - d["p50_ms"], 3),
                    "p99": round(s["p99_ms"] - d["p99_ms"], 3),
                },
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer episodes (a smoke run)")
    parser.add_argument("--engine", choices=["scripted", "vllm"], default="scripted")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--token-delay-s", type=float, default=0.0, help="scripted engine: seconds per token")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    args.concurrency = [1, 32]
    args.rounds_1 = 3 if args.quick else 10
    args.rounds = 1 if args.quick else 3

    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="forgerl-bench-gateway-") as tmp:
        root = Path(tmp)
        model = root / "model"
        tokenizer = train_tokenizer()
        if args.engine == "vllm":
            from forgerl.inference.testing import make_checkpoint

            make_checkpoint(model, "debug", seed=0)
        save_tokenizer(tokenizer, model)
        tokenizer = load_tokenizer(model)
        fmt = ChatFormat(tokenizer)
        eos = int(tokenizer.eos_token_id)
        generation = [*fmt.encode(GENERATION), eos]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORGERL_")}
        iport, gport, hport = free_port(), free_port(), free_port()
        inference_address, gateway_address = f"127.0.0.1:{iport}", f"127.0.0.1:{gport}"
        if args.engine == "scripted":
            (root / "generation.json").write_text(json.dumps(generation))
            inference_cmd = [
                python,
                "-m",
                "forgerl.gateway.testing",
                "--port",
                str(iport),
                "--generation-file",
                str(root / "generation.json"),
                "--token-delay-s",
                str(args.token_delay_s),
                "--model-path",
                str(model),
            ]
            inference_env = env
        else:
            inference_cmd = [python, "-m", "forgerl.services.inference.main"]
            inference_env = {
                **env,
                "FORGERL_INFERENCE_PORT": str(iport),
                "FORGERL_INFERENCE_MODEL_PATH": str(model),
                "FORGERL_INFERENCE_MAX_MODEL_LEN": "4096",
                "FORGERL_INFERENCE_EXECUTOR": "uni",
                "FORGERL_INFERENCE_LOG_LEVEL": "warning",
            }
        gateway_env = {
            **env,
            "FORGERL_GATEWAY_PORT": str(gport),
            "FORGERL_GATEWAY_HTTP_PORT": str(hport),
            "FORGERL_GATEWAY_INFERENCE_ADDRESS": inference_address,
            "FORGERL_GATEWAY_LOG_LEVEL": "warning",
        }
        with process(inference_cmd, inference_env, root / "inference.log") as iproc:
            wait_serving(inference_address, iproc, 600 if args.engine == "vllm" else 60, root / "inference.log")
            with process([python, "-m", "forgerl.services.gateway.main"], gateway_env, root / "gateway.log") as gproc:
                wait_serving(gateway_address, gproc, 120, root / "gateway.log")
                t0 = time.perf_counter()
                results = asyncio.run(measure(args, inference_address, gateway_address, fmt, eos))
                elapsed = time.perf_counter() - t0
    report = {
        "benchmark": "gateway",
        "engine": args.engine,
        "prompt_tokens_first_turn": len(Episode(fmt, generation).prompt),
        "generated_tokens_per_turn": len(generation) if args.engine == "scripted" else args.max_tokens,
        "token_delay_s": args.token_delay_s if args.engine == "scripted" else None,
        "results": results,
        "seconds": round(elapsed, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
