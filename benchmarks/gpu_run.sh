#!/usr/bin/env bash
# What a lent GPU runs, stage by stage, each under its own time limit: the GPU tests, the three benchmarks and the
# shapes-model training. Everything a stage produces is packed into $OUT/gpu_results.tar.gz after it, so a stage
# cut off by its limit still leaves the earlier ones' results.
#
#   OUT=/tmp/out benchmarks/gpu_run.sh install env sparse tests editing radial agent
#
# train:MINUTES continues from the shipped shapes-sd weights when runs/shapes has no checkpoint yet.
# Stages: install (on a machine without network: the wheels in .whl/ -- diffusers, tomesd and diffattn itself,
# built beforehand with `pip wheel --no-deps -w .whl .` -- into /tmp/site), env (versions, GPU), tests
# (pytest -m gpu), train:MINUTES (train-shapes, resuming runs/shapes), trainvideo:MINUTES (train-shapes-video,
# resuming runs/shapes-wan), quality (benchmarks/radial_quality.py on shapes-wan), sparse (the Triton launch sweep, whose
# fastest configs go to diffattn/kernels/launch_configs.json and the installed package, then the block-sparse benchmark:
# run it before tests so they check the configs it picked), editing (editing.py on the SD 1.5 config),
# radial (radial_e2e), agent (agent_attention), agentlayer (the agent layer eager, CUDA-graphed and compiled).
set -u
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT" logs runs
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d /tmp/site ]; then
    export PYTHONPATH=/tmp/site
fi
pack() {
    tar czf "$OUT/gpu_results.tar.gz" logs benchmarks/results diffattn/kernels/launch_configs.json runs/shapes/pipeline \
        runs/shapes/train_log.jsonl runs/shapes-wan/pipeline runs/shapes-wan/train_log.jsonl \
        2>/dev/null || true
}
for stage in "$@"; do
    start=$(date +%s)
    case "$stage" in
        install)
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1 ;;
        env)
            { nvidia-smi; (cd /tmp && python3 -c "import torch, triton, diffusers, transformers, diffattn; print(torch.__version__, triton.__version__, diffusers.__version__, transformers.__version__, diffattn.__file__, torch.cuda.get_device_name())"); } 2>&1 | tee logs/env.log ;;
        tests)
            # from outside the checkout, so the installed diffattn (with its diffattn.kernels mapping) is the one
            # imported
            (cd /tmp && timeout 200 python3 -m pytest -q -m gpu -n 6 -p no:cacheprovider "$OLDPWD/tests") 2>&1 \
                | tee logs/gpu_tests.log | tail -40 ;;
        train:*)
            minutes=${stage#train:}
            # from outside the checkout (python -m puts the working directory first on the path)
            repo=$PWD
            (cd /tmp && timeout $((minutes * 60 + 90)) python3 -m diffattn -v train-shapes --out "$repo/runs/shapes" --vae-steps 1500 \
                --unet-steps 1000000 --batch-size 128 --checkpoint-every 1000 --workers 6 --max-minutes "$minutes" \
                --init-from "$repo/diffattn/presets/shapes_sd" \
                2>&1) | tr "\r" "\n" | tail -15 | tee -a logs/train.log
            # the rate, from tqdm's last line
            tail -c 2000 runs/shapes/train_log.jsonl | tail -1 | tee -a logs/train.log ;;
        trainvideo:*)  # shapes-wan (train-shapes-video), resuming runs/shapes-wan
            # two 48-dim heads: their rotary embedding resolves a 16-token frame (README, "The video model")
            minutes=${stage#trainvideo:}
            repo=$PWD
            (cd /tmp && timeout $((minutes * 60 + 120)) python3 -m diffattn -v train-shapes-video \
                --out "$repo/runs/shapes-wan" --attention-heads 2 --batch-size 32 --vae-batch-size 16 \
                --checkpoint-every 500 \
                --max-minutes "$minutes" 2>&1) | tr "\r" "\n" | tail -15 | tee -a logs/train_video.log
            tail -c 2000 runs/shapes-wan/train_log.jsonl | tail -1 | tee -a logs/train_video.log ;;
        quality)  # radial_quality on shapes-wan (the exported run if there is one, else the shipped preset)
            model=shapes-wan
            [ -f runs/shapes-wan/pipeline/model_index.json ] && model=runs/shapes-wan/pipeline
            # --store: a second call on the same warm machine resumes what a cut-off first call finished
            timeout 540 python3 benchmarks/radial_quality.py --model "$model" --device cuda --batch 32 \
                --store runs/quality-store 2>&1 | tee logs/bench_quality.log | tail -20 ;;
        sparse)
            timeout 240 python3 benchmarks/block_sparse_attention.py --sweep --backward-max-tokens 40000 \
                --write-launch-configs diffattn/kernels/launch_configs.json 2>&1 | tee logs/bench_sparse.log | tail -30 ;;
        editing)
            timeout 120 python3 benchmarks/editing.py --model sd15-config 2>&1 | tee logs/bench_editing.log | tail -14 ;;
        radial)
            timeout 80 python3 benchmarks/radial_e2e.py 2>&1 | tee logs/bench_radial.log | tail -20 ;;
        agent)
            timeout 90 python3 benchmarks/agent_attention.py --no-install 2>&1 | tee logs/bench_agent.log | tail -20 ;;
        agentlayer)  # the agent layer eager, in a CUDA graph and compiled (torch.compile), against SDPA the same ways
            timeout 180 python3 benchmarks/agent_attention.py --no-install --layer-only --compile 2>&1 \
                | tee logs/bench_agent_layer.log | tail -10 ;;
        *)
            echo "unknown stage $stage"; exit 2 ;;
    esac
    echo "stage $stage: $(( $(date +%s) - start )) s" | tee -a logs/stages.log
    pack
done
