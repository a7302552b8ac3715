# Sourced by scripts/slurm_up.sh and scripts/cluster2_up.sh: slurm-wlm and munge installed with
# apt-get when missing. The caller defines `cannot` (one line on stderr, exit 3) and NAME (its log prefix).
install_slurm_if_missing() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || cannot "slurm-wlm is not installed and there is no apt-get"
  echo "$NAME: installing slurm-wlm and munge" >&2
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null \
      || cannot "apt-get install slurm-wlm munge failed"
  fi
}
