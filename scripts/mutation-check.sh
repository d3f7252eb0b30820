#!/usr/bin/env bash
# Removes each race fix in turn (in a scratch copy of the tree) and checks that the race
# test written for it fails. Prints one line per mutation; exits non-zero if a mutated
# tree still passes its test (a test that cannot see its race).
#
#   scripts/mutation-check.sh            # all mutations
#   scripts/mutation-check.sh remove     # only those whose name contains "remove"
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/mutation}"
failed=0

# name @ file @ perl substitution (removes the fix) @ test file (lib: unit tests; PKG/FILE for
# a test of another package than cowsnap-core) @ test that must fail
mutations=(
  "S1/S4: origin write does not wait for tracked reads@crates/cowsnap-core/src/exception/tracker.rs@s/if !st.tracked.contains_key\(&old\) \{\n\s*return;/if true {\n return;/@race@s1_snapshot_read_of_a_pending_chunk_never_sees_later_origin_data"
  "S4: remapped chunk ignores reads still in flight@crates/cowsnap-core/src/exception/tracker.rs@s/reads_in_flight: st.tracked.contains_key\(&old\)/reads_in_flight: false/@race@s4_origin_write_waits_for_snapshot_reads_in_flight_on_the_origin"
  "S4: no read tracking at all@crates/cowsnap-core/src/exception/tracker.rs@s/\*st.tracked.entry\(old\).or_insert\(0\) \+= 1;//@race@s4_origin_write_waits_for_snapshot_reads_in_flight_on_the_origin"
  "S2: origin write drops the snapshot-list guard before writing@crates/cowsnap-core/src/targets/origin.rs@s/let snaps = self.snapshots.read\(\);\n        self.copy_out\(&snaps, offset, buf.len\(\) as u64\);/let snaps = self.snapshots.read().clone();\n        self.copy_out(&snaps, offset, buf.len() as u64);/@race@s2_activation_waits_for_origin_writes_in_flight"
  "S3: origin write does not wait on pending exceptions it does not own@crates/cowsnap-core/src/targets/origin.rs@s/let _ = p.wait\(\);//@race@s3_origin_writes_wait_on_the_pending_exceptions_of_every_snapshot"
  "abandoned exceptions are not aborted in the store@crates/cowsnap-core/src/targets/origin.rs@s/batches\[i\].push\(s.own\(o\)\);/batches[i].push(o);/@engine@a_request_that_panics_mid_copy_never_blocks_later_commits"
  "zero-ahead: frontier moves before the zeros are written@crates/cowsnap-core/src/dev/prezero.rs@s/(\s*self.zero\(from, offset.max\(from\).min\(to\)\)\?;\n\s*self.zero\(end.max\(from\), to\)\?;)(\n\s*self.frontier.store\(to.max\(end\), Ordering::Release\);)/\$2\$1/@lib@dev::prezero::tests::concurrent_front_filling_writes_are_never_zeroed"
  "remove: snapshot deactivated before the manifest marks it removing (the manifest write takes 200 ms)@crates/cowsnap-core/src/pool/active.rs@s/(        inner\.pool\.mark_removing\(name\)\?;\n)(        let Some\(active\) = inner\.snapshots\.remove\(name\) else \{.*?\n        \}\n)(        crash_point\(\"remove-snapshot:deactivated\"\);\n)/\$2        std::thread::sleep(std::time::Duration::from_millis(200));\n\$3\$1/s@cowsnap/control_crash@a_live_create_or_remove_killed_at_any_step_loses_nothing"
  "format guard: an adopted file formatted before its entry is committed@crates/cowsnap-core/src/pool/mod.rs@s/self.commit\(next\)\?;\n(\s*crash_point\(\"adopt-format:guarded\"\);)/\$1/@cowsnap/control_crash@a_live_format_adoption_killed_at_any_step_leaves_no_valid_cow_outside_the_pool"
  "combiner: exceptions committed before their copy is written@crates/cowsnap-core/src/copy/combine.rs@s/(\n    let mut i = 0;\n    while i < list.len\(\) \{)/\n    let st = &get(list[0].1, list[0].2).store;\n    st.mark_ready(&list.iter().flat_map(|&(_, r, w)| get(r, w).exceptions.clone()).collect::<Vec<_>>());\n    st.commit_ready();\$1/@crash@crash_at_every_boundary_of_random_workloads"
)

only="${1:-}"
for m in "${mutations[@]}"; do
  IFS='@' read -r name file subst testfile test <<<"$m"
  [[ -z "$only" || "$name" == *"$only"* ]] || continue
  rm -rf "$scratch/tree"; mkdir -p "$scratch/tree"
  (cd "$repo" && git ls-files -z | xargs -0 cp --parents -t "$scratch/tree")
  before=$(sha256sum "$scratch/tree/$file")
  perl -0pi -e "$subst" "$scratch/tree/$file"
  if [ "$before" = "$(sha256sum "$scratch/tree/$file")" ]; then
    echo "BROKEN  $name: the substitution did not apply"; failed=1; continue
  fi
  pkg=cowsnap-core
  case "$testfile" in */*) pkg=${testfile%%/*}; testfile=${testfile#*/};; esac
  if (cd "$scratch/tree" && timeout 300 cargo test -q -p "$pkg" $([ "$testfile" = lib ] && echo --lib || echo --test "$testfile") -- --exact "$test" >"$scratch/log" 2>&1); then
    echo "SURVIVED $name: $test still passes"; failed=1
  else
    if grep -q "panicked at" "$scratch/log"; then
      echo "killed   $name: $test fails: $(grep -A1 'panicked at' "$scratch/log" | tail -1)"
    else
      echo "BROKEN   $name: $test did not fail by assertion:"; tail -5 "$scratch/log"; failed=1
    fi
  fi
done
exit $failed
