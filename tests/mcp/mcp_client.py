"""Drive an MCP server with the official Python SDK, for Warden's gateway tests.

    mcp_client.py PLAN.json -- COMMAND [ARGS...]          (stdio)
    mcp_client.py PLAN.json --url URL     (Streamable HTTP; bearer token from WARDEN_TOKEN)

PLAN.json is either a list of steps, run in one session, or several sessions run one
after the other, each with its own credential and client capabilities:
  {"sessions": [{"token_env": "TOKEN_A", "callbacks": ["sampling", "elicitation"],
                 "steps": [...]}, ...]}
`token_env` names the variable that holds the session's token (given to the proxy as
WARDEN_TOKEN over stdio, sent as the bearer token over HTTP); without it, WARDEN_TOKEN.
`callbacks` declares the client capabilities the session answers: `sampling` (answers
every sampling/createMessage with a fixed text) and `elicitation` (declines every
elicitation/create); each request that reaches the client prints one line
({"op": "sampling_request", "max_tokens": n} or {"op": "elicitation_request"}).
With `sessions`, every printed line carries "session": its index.

Each step prints one JSON line with its result:
  {"op": "list_tools"}                      -> {"tools": [names]}
  {"op": "call", "name": N, "arguments": {}, "meta": {}, "timeout": s}
                                            -> {"is_error": bool, "text": str, "meta": {...}}
                                               or {"error": str} for a JSON-RPC error
  {"op": "list_resources"}                  -> {"count": n, "uris": [sorted]}
  {"op": "list_resource_templates"}         -> {"count": n, "uris": [sorted templates]}
  {"op": "list_prompts"}                    -> {"count": n, "names": [sorted]}
  {"op": "ping"}                            -> {"ok": true}
  {"op": "read_resource", "uri": U}         -> {"ok": true, "count": n, "text": first text}
  {"op": "subscribe_resource", "uri": U}    -> {"ok": true}
  {"op": "get_prompt", "name": N, "arguments": {}}
                                            -> {"ok": true, "text": the messages' text}
  {"op": "complete", "ref": {"type": "ref/prompt", "name": N} or {"type": "ref/resource",
   "uri": U}, "argument": {"name": A, "value": V}}
                                            -> {"ok": true, "values": [...]}
     (the four above print {"ok": false, "error": str, "code": n} for a JSON-RPC error)
  {"op": "call_in_background", ...call fields}  starts a call, result printed when done
  {"op": "sleep", "seconds": s}
  {"op": "wait_background"}                 waits for background calls
Each session first prints {"op": "initialize", "protocol": version, "server": name}.
"""

import json
import os
import sys

import anyio
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client

# The index of the session being run, added to every line when the plan has sessions.
SESSION = None


def emit(obj):
    if SESSION is not None:
        obj = {**obj, "session": SESSION}
    print(json.dumps(obj), flush=True)


async def call(session, step):
    try:
        res = await session.call_tool(
            step["name"],
            step.get("arguments", {}),
            read_timeout_seconds=step.get("timeout", 30),
            meta=step.get("meta"),
        )
    except Exception as e:  # a JSON-RPC error or a transport failure
        return {"op": "call", "name": step["name"], "error": str(e)}
    text = "\n".join(getattr(c, "text", "") or "" for c in (res.content or []))
    meta = getattr(res, "meta", None) or {}
    if hasattr(meta, "model_dump"):
        meta = meta.model_dump()
    return {"op": "call", "name": step["name"], "is_error": bool(res.is_error), "text": text, "meta": meta}


def texts(items):
    """The text of content blocks or resource contents, joined."""
    out = []
    for item in items or []:
        content = getattr(item, "content", item)
        text = getattr(content, "text", None)
        if text:
            out.append(text)
    return "\n".join(out)


async def attempt(step, request, describe):
    """Runs one request; a refusal is an MCP error, reported rather than raised."""
    try:
        result = await request
    except Exception as e:
        code = getattr(e, "code", None)
        emit({"op": step["op"], "ok": False, "error": str(e), "code": code})
        return
    emit({"op": step["op"], "ok": True, **describe(result)})


def reference(ref):
    if ref["type"] == "ref/prompt":
        return types.PromptReference(type="ref/prompt", name=ref["name"])
    return types.ResourceTemplateReference(type="ref/resource", uri=ref["uri"])


async def run(session, plan):
    init = await session.initialize()
    emit({"op": "initialize", "protocol": init.protocol_version, "server": init.server_info.name})
    async with anyio.create_task_group() as tg:
        for step in plan:
            op = step["op"]
            if op == "list_tools":
                tools = await session.list_tools()
                emit({"op": op, "tools": sorted(t.name for t in tools.tools)})
            elif op == "call":
                emit(await call(session, step))
            elif op == "call_in_background":
                async def bg(step=step):
                    emit(await call(session, step))
                tg.start_soon(bg)
            elif op == "list_resources":
                res = await session.list_resources()
                emit({"op": op, "count": len(res.resources), "uris": sorted(str(r.uri) for r in res.resources)})
            elif op == "list_resource_templates":
                res = await session.list_resource_templates()
                uris = sorted(t.uri_template for t in res.resource_templates)
                emit({"op": op, "count": len(uris), "uris": uris})
            elif op == "list_prompts":
                res = await session.list_prompts()
                emit({"op": op, "count": len(res.prompts), "names": sorted(p.name for p in res.prompts)})
            elif op == "read_resource":
                await attempt(
                    step,
                    session.read_resource(step["uri"]),
                    lambda r: {"count": len(r.contents), "text": texts(r.contents)},
                )
            elif op == "subscribe_resource":
                await attempt(step, session.subscribe_resource(step["uri"]), lambda r: {})
            elif op == "get_prompt":
                await attempt(
                    step,
                    session.get_prompt(step["name"], step.get("arguments")),
                    lambda r: {"text": texts(r.messages)},
                )
            elif op == "complete":
                await attempt(
                    step,
                    session.complete(reference(step["ref"]), step["argument"]),
                    lambda r: {"values": list(r.completion.values)},
                )
            elif op == "ping":
                await session.send_ping()
                emit({"op": op, "ok": True})
            elif op == "sleep":
                await anyio.sleep(step["seconds"])
            elif op == "wait_background":
                pass  # the task group waits at its end
            else:
                raise SystemExit(f"unknown op {op}")


async def sampling(context, params):
    emit({"op": "sampling_request", "max_tokens": params.max_tokens})
    return types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text="sampled by the test client"),
        model="test-model",
    )


async def elicitation(context, params):
    emit({"op": "elicitation_request"})
    return types.ElicitResult(action="decline")


def client_session(read, write, callbacks):
    unknown = set(callbacks) - {"sampling", "elicitation"}
    if unknown:
        raise SystemExit(f"unknown callbacks {sorted(unknown)}")
    # Only what is asked for is declared: a capability changes what the server offers.
    return ClientSession(
        read,
        write,
        sampling_callback=sampling if "sampling" in callbacks else None,
        elicitation_callback=elicitation if "elicitation" in callbacks else None,
    )


async def run_session(args, steps, token, callbacks):
    if "--url" in args:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        url = args[args.index("--url") + 1]
        headers = {}
        # The token comes from the environment, never argv (where `ps` shows it).
        if token:
            headers["Authorization"] = "Bearer " + token
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
            async with streamable_http_client(url, http_client=http) as streams:
                read, write = streams[0], streams[1]
                async with client_session(read, write, callbacks) as session:
                    await run(session, steps)
    else:
        cmd = args[args.index("--") + 1:]
        # Like an MCP client config's `env`: the proxy gets its token from the environment.
        env = dict(os.environ)
        if token is not None:
            env["WARDEN_TOKEN"] = token
        params = StdioServerParameters(command=cmd[0], args=cmd[1:], env=env)
        async with stdio_client(params) as (read, write):
            async with client_session(read, write, callbacks) as session:
                await run(session, steps)


async def main():
    global SESSION
    args = sys.argv[1:]
    plan = json.load(open(args[0]))
    if isinstance(plan, list):
        await run_session(args, plan, os.environ.get("WARDEN_TOKEN"), [])
        return
    for i, s in enumerate(plan["sessions"]):
        SESSION = i
        token = os.environ[s["token_env"]] if "token_env" in s else os.environ.get("WARDEN_TOKEN")
        await run_session(args, s["steps"], token, s.get("callbacks", []))


if __name__ == "__main__":
    anyio.run(main)
