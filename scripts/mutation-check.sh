#!/usr/bin/env bash
# Switches off each safety rule in turn (a mutation switch, `cowsnap_core::mutation`) and
# checks that the test written for it fails by assertion. Builds once with the `mutations`
# feature; each run sets COWSNAP_MUTATION to one switch's name. Prints one line per
# mutation: killed (the test failed by assertion), SURVIVED (the test passed: it cannot see
# its rule missing) or BROKEN (the switch is not in the source, or the test failed some
# other way). Exits non-zero unless every selected mutation is killed.
#
#   scripts/mutation-check.sh            # all mutations
#   scripts/mutation-check.sh remove     # only those whose switch name contains "remove"
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# A target directory of its own: the feature changes cowsnap-core, and sharing target/
# would rebuild the ordinary test binaries after every check.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/mutation}"
features=(--features cowsnap-core/mutations)
failed=0

# switch name @ package @ test target (lib: the package's unit tests) @ test that must fail
mutations=(
  "s1-drain-skipped@cowsnap-core@race@s1_snapshot_read_of_a_pending_chunk_never_sees_later_origin_data"
  "s4-remapped-ignores-reads@cowsnap-core@race@s4_origin_write_waits_for_snapshot_reads_in_flight_on_the_origin"
  "s4-reads-untracked@cowsnap-core@race@s4_origin_write_waits_for_snapshot_reads_in_flight_on_the_origin"
  "s2-guard-dropped@cowsnap-core@race@s2_activation_waits_for_origin_writes_in_flight"
  "s3-pending-not-waited@cowsnap-core@race@s3_origin_writes_wait_on_the_pending_exceptions_of_every_snapshot"
  "abandon-not-aborted@cowsnap-core@engine@a_request_that_panics_mid_copy_never_blocks_later_commits"
  "prezero-frontier-early@cowsnap-core@lib@dev::prezero::tests::concurrent_front_filling_writes_are_never_zeroed"
  "remove-deactivated-before-mark@cowsnap@control_crash@a_live_create_or_remove_killed_at_any_step_loses_nothing"
  "format-before-commit@cowsnap@control_crash@a_live_format_adoption_killed_at_any_step_leaves_no_valid_cow_outside_the_pool"
  "batcher-commit-before-write@cowsnap-core@crash@crash_at_every_boundary_of_random_workloads"
  "nbd-export-looked-up-again@cowsnap-nbd@bad_input@a_client_told_yes_is_served_though_its_export_went_away_during_the_handshake"
  "index-run-not-synced@cowsnap-core@index@a_crash_at_every_step_of_a_checkpoint_leaves_an_index_equal_to_a_full_scan"
  "merge-origin-not-flushed@cowsnap-core@merge@a_merge_survives_a_crash_at_every_write_and_flush"
  "merge-window-not-waited@cowsnap-core@merge@a_view_write_into_the_merging_window_waits_for_the_commit"
  "merge-skips-copy-out@cowsnap-core@merge@a_merge_rolls_the_origin_back_while_the_view_and_other_snapshots_take_writes"
  "merge-snapshot-writes-not-drained@cowsnap-core@merge@the_switch_waits_for_the_snapshots_own_writes_in_flight"
  "merge-view-holds-list@cowsnap-core@merge@a_view_write_waiting_on_the_window_never_blocks_the_merger_behind_a_deactivation"
  "bbr-salvage-not-listed@cowsnap-core@bbr@a_relocation_that_lost_a_sector_survives_a_power_cut_at_every_step"
  "layered-origin-file-holes@cowsnap@layers@block_status_of_an_origin_on_layers_is_the_volumes_not_its_files"
  "bbr-writes-ignore-pending@cowsnap-core@bbr@a_write_during_a_relocation_waits_for_it"
  "bbr-cleared-untracked@cowsnap-core@bbr@a_relocation_waits_for_a_write_that_clears_the_list"
  "bbr-relocation-not-drained@cowsnap-core@bbr@a_relocation_waits_for_writes_already_going_to_the_failing_chunk"
  "merge-switched-before-record@cowsnap@control_crash@a_merge_killed_at_any_control_step_finishes_at_the_next_start"
)

target_args() { # PACKAGE TARGET
  if [ "$2" = lib ]; then echo "-p $1 --lib"; else echo "-p $1 --test $2"; fi
}

only="${1:-}"
selected=()
for m in "${mutations[@]}"; do
  IFS='@' read -r name pkg target test <<<"$m"
  [[ -z "$only" || "$name" == *"$only"* ]] || continue
  # A renamed or deleted switch must not pass as "killed" by an unrelated failure.
  if ! grep -rqF --include='*.rs' "mutation::active(\"$name\")" crates; then
    echo "BROKEN   $name: no mutation::active(\"$name\") in crates/"
    failed=1
    continue
  fi
  selected+=("$m")
done

# One build of every test binary the selected mutations run (a daemon test also needs the
# cowsnap binary, which cargo builds with the feature for that package's tests).
build=()
for m in "${selected[@]}"; do
  IFS='@' read -r name pkg target test <<<"$m"
  # shellcheck disable=SC2207
  build+=($(target_args "$pkg" "$target"))
done
if [ ${#build[@]} -gt 0 ]; then
  echo "mutation-check: building with ${features[*]}"
  if ! cargo test -q "${features[@]}" --no-run "${build[@]}" >"$scratch/build.log" 2>&1; then
    echo "BROKEN   the build with ${features[*]} failed:"
    tail -20 "$scratch/build.log"
    exit 1
  fi
fi

for m in "${selected[@]}"; do
  IFS='@' read -r name pkg target test <<<"$m"
  # shellcheck disable=SC2046
  if COWSNAP_MUTATION="$name" timeout 300 cargo test -q "${features[@]}" $(target_args "$pkg" "$target") \
      -- --exact "$test" >"$scratch/log" 2>&1; then
    if grep -q "running 1 test" "$scratch/log"; then
      echo "SURVIVED $name: $test still passes"
    else
      echo "BROKEN   $name: no test $test in $pkg $target"
    fi
    failed=1
  elif grep -q "panicked at" "$scratch/log"; then
    echo "killed   $name: $test fails: $(grep -A1 'panicked at' "$scratch/log" | tail -1)"
  else
    echo "BROKEN   $name: $test did not fail by assertion:"
    tail -5 "$scratch/log"
    failed=1
  fi
done
exit $failed
