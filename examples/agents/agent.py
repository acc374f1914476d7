"""An example agent: a small MCP server exposing `execute_task`, which delegation workflows call.

Each role does plain, deterministic text work so a workflow's result can be checked:
`researcher` pulls the key terms out of a topic, `writer` drafts a paragraph from the
research it receives as `context`, `reviewer` judges the draft. Run one per role:

    python agent.py --role writer --port 8080
"""

from __future__ import annotations

import argparse
import re

from mcp.server.mcpserver import MCPServer

STOPWORDS = {"a", "an", "and", "the", "of", "for", "to", "in", "on", "with", "how", "what", "why", "is", "are"}


def research(task: str, context: dict | None) -> dict:
    terms = sorted({w for w in re.findall(r"[a-z0-9-]+", task.lower()) if w not in STOPWORDS})
    return {"topic": task, "terms": terms}


def write(task: str, context: dict | None) -> dict:
    findings = [v for v in (context or {}).values() if isinstance(v, dict) and "terms" in v]
    sentences = [f"On {f['topic']}, the key points are {', '.join(f['terms'])}." for f in findings]
    draft = f"{task}. " + " ".join(sentences) if sentences else f"{task}. No research was provided."
    return {"draft": draft, "sources": len(findings)}


def review(task: str, context: dict | None) -> dict:
    drafts = [v["draft"] for v in (context or {}).values() if isinstance(v, dict) and "draft" in v]
    words = sum(len(d.split()) for d in drafts)
    approved = bool(drafts) and words >= 10
    return {"approved": approved, "words": words,
            "notes": "ready to publish" if approved else "needs a draft of at least 10 words"}


ROLES = {"researcher": research, "writer": write, "reviewer": review}


def build(role: str) -> MCPServer:
    work = ROLES[role]
    server = MCPServer(f"{role}-agent")

    @server.tool(description=f"Carry out one delegated {role} task; results of earlier tasks arrive in `context`")
    def execute_task(task: str, context: dict | None = None) -> dict:
        return {"role": role, **work(task, context)}

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=sorted(ROLES), required=True)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    build(args.role).run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
