#!/usr/bin/env bash
# What a lent GPU runs, stage by stage, each under its own time limit: the GPU tests, the benchmarks and the
# shapes-model training. Everything a stage produces is packed into $OUT/gpu_results.tar.gz after it, so a stage
# cut off by its limit still leaves the earlier ones' results.
#
#   OUT=/tmp/out DEADLINE=$(( $(date +%s) + 570 )) benchmarks/gpu_run.sh install env trainvideo:4 preset quality:targets
#
# DEADLINE (seconds since the epoch, optional): no stage runs past it (each one's limit is cut to what is left).
# train:MINUTES continues from the shipped shapes-sd weights when runs/shapes has no checkpoint yet.
# Stages: install (on a machine without network: the wheels in .whl/ -- diffusers, importlib_metadata and diffattn
# itself, built beforehand with `pip wheel --no-deps -w .whl .` -- into /tmp/site), env (versions, GPU), tests
# (pytest -m gpu), train:MINUTES (train-shapes, resuming runs/shapes), trainvideo:MINUTES (train-shapes-video,
# resuming runs/shapes-wan, else starting from INIT_FROM: by default the shipped shapes-wan weights re-split into two
# heads; benchmarks/results/shapes_wan_h200/pipeline continues the H200 run of 2026-12-04), preset (the
# trained runs/shapes-wan/pipeline becomes the installed package's shapes-wan preset, so what follows measures it as
# users load it), quality:PART[,PART] (benchmarks/radial_quality.py on the shapes-wan preset, PARTs of targets,
# fidelity, energy, extension), levels (benchmarks/shapes_wan_noise_levels.py: the shapes-wan preset, after `preset`
# the trained one, against the repository's diffattn/presets/shapes_wan, on 96 prompts from noise and from sigma
# 0.87 and 0.73, where a better-trained transformer shows first), sparse (the Triton launch sweep, whose fastest
# configs go to diffattn/kernels/launch_configs.json and the installed package, then the block-sparse benchmark:
# run it before tests so they check the configs it picked), editing (editing.py on the SD 1.5 config), radial (radial_e2e), agent
# (agent_attention), agentlayer (the agent layer eager, CUDA-graphed and compiled).
# TRAIN_ARGS: extra train-shapes-video flags (e.g. "--clip-speeds 1 --no-bounce": clips whose caption says all of
# the motion, less smear but attention to far frames, which cost radial its lead on the CPU, docs/shapes-wan.md;
# "--clip-speeds 1 --no-bounce --varying-speed": the same with each frame's move drawn from 0-2 px, which kept
# radial's lead on the CPU but read the first 8 frames' direction worse;
# "--warmup-frames 1 --warmup-steps 1500": single frames first;
# "--image-every 2 --image-batch-size 512": every second step on 512 single frames, where the shapes are learnt
# (on the CPU, 195,000 more frames took the shapes found in images from 35% to 78%, docs/shapes-wan.md);
# with INIT_VAE_ONLY=1, "--width 192 --ffn-dim 512 --attention-heads 4": a new transformer twice as wide);
# INIT_VAE_ONLY=1: a run that starts (no checkpoint yet) takes INIT_FROM's autoencoder only, a new transformer.
# DECODER_FROM: a run that starts takes this folder's decoder instead of INIT_FROM's (the same encoder and latent
# calibration, checked), e.g. DECODER_FROM=diffattn/presets/shapes_wan (trained on 33-frame clips) with the H200 run.
# DEVICE (default cuda), TRAIN_BATCH, QUALITY_ARGS (extra radial_quality flags) and LEVELS_VIDEOS (96) let a CPU
# rehearse the stages.
set -u
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT" logs runs
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
DEVICE=${DEVICE:-cuda}
QUALITY_ARGS=${QUALITY_ARGS:-}
TRAIN_BATCH=${TRAIN_BATCH:-128}  # clips per shapes-wan step
read -r -a TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
DEADLINE=${DEADLINE:-}
# seconds a stage may run: its own cap, cut to what is left before DEADLINE (less 10 s to pack)
limit() {
    local cap=$1
    if [ -n "$DEADLINE" ]; then
        local left=$(( DEADLINE - $(date +%s) - 10 ))
        [ "$left" -lt "$cap" ] && cap=$left
    fi
    [ "$cap" -lt 1 ] && cap=1
    echo "$cap"
}
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
            { nvidia-smi; nproc; df -h /dev/shm /tmp; (cd /tmp && python3 -c "import torch, triton, diffusers, transformers, diffattn; print(torch.__version__, triton.__version__, diffusers.__version__, transformers.__version__, diffattn.__file__, torch.cuda.get_device_name())"); } 2>&1 | tee logs/env.log ;;
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
            # two 48-dim heads: a lower loss on the same batches than four 24-dim ones (README, "The video model");
            # captions padded to 32 or 512 tokens, so that the weights also read prompts at WanPipeline's default 512
            minutes=${stage#trainvideo:}
            repo=$PWD
            init=()
            [ -f runs/shapes-wan/checkpoint.pt ] || init=(--init-from "$repo/${INIT_FROM:-diffattn/presets/shapes_wan}")
            [ -f runs/shapes-wan/checkpoint.pt ] || [ "${INIT_VAE_ONLY:-0}" != 1 ] || init+=(--init-vae-only)
            [ -f runs/shapes-wan/checkpoint.pt ] || [ -z "${DECODER_FROM:-}" ] \
                || init+=(--init-decoder-from "$repo/$DECODER_FROM")
            workers=$(( $(nproc) - 2 ))
            [ "$workers" -gt 12 ] && workers=12
            # the workers hand their clips over in shared memory (about 54 MB a batch, 4 batches ahead each)
            shm_mb=$(( $(df -k --output=avail /dev/shm 2>/dev/null | tail -1 || echo 0) / 1024 ))
            [ "$shm_mb" -lt $(( workers * 4 * 54 * 2 )) ] && workers=$(( shm_mb / (4 * 54 * 2) ))
            echo "train workers: $workers (shm $shm_mb MB)" | tee -a logs/train_video.log
            seconds=$(awk "BEGIN { print int($minutes * 60) + 120 }")
            for attempt in 1 2; do
                (cd /tmp && timeout "$(limit "$seconds")" python3 -m diffattn -v train-shapes-video \
                    --out "$repo/runs/shapes-wan" "${init[@]}" --attention-heads 2 --batch-size "$TRAIN_BATCH" --lr 3e-4 \
                    --ema-decay 0.997 --denoiser-steps 1000000 --checkpoint-every 500 --workers "$workers" \
                    --caption-lengths 32 512 \
                    --device "$DEVICE" --max-minutes "$minutes" "${TRAIN_EXTRA[@]}" 2>&1) | tr "\r" "\n" | tail -25 \
                    | tee -a logs/train_video.log
                [ -f runs/shapes-wan/pipeline/model_index.json ] && break
                # no export: once more without worker processes, for what is left of the time
                workers=0
                minutes=$(awk "BEGIN { m = ($(limit 100000) - 60) / 60; print (m > 0.5 ? m : 0.5) }")
                echo "train: no export, again with no workers for $minutes minutes" | tee -a logs/train_video.log
            done
            tail -c 2000 runs/shapes-wan/train_log.jsonl | tail -1 | tee -a logs/train_video.log ;;
        preset)  # the trained pipeline becomes the installed package's shapes-wan
            installed=$(cd /tmp && python3 -c "import diffattn.presets, pathlib; print(pathlib.Path(diffattn.presets.__file__).parent / 'shapes_wan')")
            if [ -f runs/shapes-wan/pipeline/model_index.json ]; then
                rm -rf "$installed" && cp -r runs/shapes-wan/pipeline "$installed" && echo "preset: $installed" \
                    | tee -a logs/stages.log
            else
                echo "preset: no trained pipeline, the shipped shapes-wan stays" | tee -a logs/stages.log
            fi ;;
        quality:*)  # radial_quality on the shapes-wan preset; --store: a cut-off run resumes on the same machine
            parts=${stage#quality:}
            name=${parts//,/-}
            DIFFATTN_JUDGE_WORKERS=$(nproc) timeout "$(limit 600)" python3 benchmarks/radial_quality.py \
                --parts ${parts//,/ } --device "$DEVICE" --batch 32 --store runs/quality-store \
                --out "benchmarks/results/radial_quality-$name-gpu.json" $QUALITY_ARGS 2>&1 \
                | tee -a "logs/bench_quality_$name.log" | tail -20 ;;
        levels)  # where sampling loses the objects: the installed preset against the checkout's shipped weights
            DIFFATTN_JUDGE_WORKERS=$(nproc) timeout "$(limit 420)" python3 benchmarks/shapes_wan_noise_levels.py \
                --device "$DEVICE" --batch 32 --models shapes-wan diffattn/presets/shapes_wan \
                --videos "${LEVELS_VIDEOS:-96}" --start-steps 0 6 10 --out benchmarks/results/shapes_wan_noise_levels-gpu.json \
                2>&1 | tee -a logs/bench_levels.log | tail -30 ;;
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
