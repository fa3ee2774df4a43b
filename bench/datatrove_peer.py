"""The peer for bench/data_prepare.py: datatrove's JsonlReader -> DocumentTokenizer on a folder of JSON Lines.

Runs in the benchmark's own environment (datatrove is not a Keel dependency), one task per file:

    python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install datatrove==0.10.1 tokenizers==0.23.3 orjson
    /tmp/bench-venv/bin/python bench/datatrove_peer.py DATA_DIR TOKENIZER_JSON OUT_DIR WORKERS

Prints the wall-clock seconds of the pipeline run. TOKENIZERS_PARALLELISM=false is set so that each worker is one
core, as each of Keel's is; documents are not shuffled (Keel's shards keep document order too).
"""

from __future__ import annotations

import os
import sys
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"


def main() -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    data, tokenizer, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tasks = len([f for f in os.listdir(data) if f.endswith(".jsonl")])
    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(data, glob_pattern="*.jsonl"),
            DocumentTokenizer(
                f"{out}/tokens",
                tokenizer_name_or_path=tokenizer,
                eos_token="<|endoftext|>",
                shuffle_documents=False,
            ),
        ],
        tasks=tasks,
        workers=workers,
        logging_dir=f"{out}/logs",
    )
    t0 = time.perf_counter()
    executor.run()
    print(time.perf_counter() - t0)


if __name__ == "__main__":
    main()
