# Launch defaults, in one place: run settings and the NCCL / PyTorch environment for
# InfiniBand and RoCE clusters. Every line is `export NAME="${NAME:-default}"`, so a value
# already in the environment wins. `launch/pretrain_7b.sh` sources this file in its bash
# form and reads it line by line in every rank (its Python form), so both launch forms
# and every node see the same values. Keep that one-line format: the Python side parses it.

# --- run settings (each also a command-line option of launch/pretrain_7b.sh) ---
export PROFILE="${PROFILE:-ds_configs/7b_zero3.json}"   # --profile
export OUT_DIR="${OUT_DIR:-runs/7b}"                    # --out: checkpoints, logs, metrics, profile.json
export RESUME="${RESUME:-auto}"                         # --resume: auto | none | global_stepN
export MASTER_PORT="${MASTER_PORT:-29500}"              # --master-port
export LAUNCHER="${LAUNCHER:-pdsh}"                     # --launcher: pdsh | openmpi | mvapich

# --- NCCL on InfiniBand / RoCE ---
# Warnings and errors only; set INFO to see which transport (NET/IB, NET/Socket) NCCL picked:
# "NET/Socket" on an InfiniBand cluster means RDMA is not in use and runs will be slow.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Queue-pair timeout 4.096 µs × 2^22 ≈ 17 s (NCCL's default 18 ≈ 1 s) and more retries: large
# fabrics under load drop packets; a longer timeout survives a congested link instead of aborting.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-10}"
# A hung or failed collective raises in every rank (and the launcher stops the job) instead of
# blocking until the job's time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Hangs: NCCL's flight recorder keeps each rank's last 2000 collectives and writes them when one
# times out (train.collective_timeout_s); the trainer points the files at OUT/hang/nccl-rank-N,
# beside its watchdog's stacks (TORCH_NCCL_DEBUG_INFO_TEMP_FILE; pipeline/watchdog.py).
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
# ZeRO-3 gathers and frees parameters all the time; expandable segments avoid the fragmentation
# that otherwise shows up as out-of-memory with gigabytes "reserved but unallocated".
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# One OpenMP thread per rank: eight ranks per node each spawning a thread per core oversubscribe it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# Site-specific: uncomment and set for your fabric (ask your cluster's documentation).
# Which HCAs to use (default: all); e.g. mlx5_0,mlx5_1,... or ^mlx5_bond_0 to exclude one.
#   export NCCL_IB_HCA=mlx5
# RoCE v2 needs the GID index of the RoCE v2 address (often 3); InfiniBand ignores it.
#   export NCCL_IB_GID_INDEX=3
# Interface for NCCL's bootstrap and socket fallback, and for the gloo side channel.
#   export NCCL_SOCKET_IFNAME=ib0        GLOO_SOCKET_IFNAME=ib0
# RoCE traffic class / InfiniBand service level for lossless queues, if the fabric defines them.
#   export NCCL_IB_TC=106                NCCL_IB_SL=0
