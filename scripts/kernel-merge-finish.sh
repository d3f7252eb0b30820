#!/usr/bin/env bash
# Ask the real kernel to finish a merge: `snapshot-merge ORIGIN COW P CHUNK` in a fresh
# VM of ../shared/kernel-rig (via its check-cow.sh -M -w), polled until
# allocated == metadata (done) or the status says Merge failed / Invalid.
# The direction "cowsnap merges part of a COW and stops, the kernel finishes it".
#
# Usage: scripts/kernel-merge-finish.sh [-i] [-o OUTDIR] [-c CHUNK] ORIGIN COW
#   ORIGIN, COW  raw images, or .gz
#   (default)    works on COPIES: the images are copied (decompressed) to a temp dir,
#                the guest's writes go to the copies; ORIGIN and COW are left untouched
#   -o OUTDIR    keep the merged copies as OUTDIR/origin.img, OUTDIR/cow.img and the
#                guest output as OUTDIR/guest/
#   -i           IN PLACE: the kernel merges into ORIGIN and COW themselves (raw files only)
#   -c CHUNK     table chunk size (default: from the COW header; the header wins anyway)
# Prints check-cow.sh's KEY: value lines, then
#   sha256_merged_origin: <sha256 of the origin device after the merge>
#   status: <the merge target's final status line>
#   exit_code: <check-cow.sh's exit code: 0 = merged, 1 = rejected / Merge failed / Invalid, >1 rig failure>
# and exits with that code.
set -uo pipefail
cd "$(dirname "$0")/.."
RIG="${RIG:-$(cd .. && pwd)/shared/kernel-rig}"
[ -x "$RIG/check-cow.sh" ] || { echo "no rig at $RIG" >&2; exit 2; }
INPLACE=0; OUTDIR=; CHUNK=
while getopts "io:c:h" opt; do
    case "$opt" in
        i) INPLACE=1 ;;
        o) OUTDIR="$OPTARG" ;;
        c) CHUNK="$OPTARG" ;;
        *) sed -n '2,/^set /{/^#/p}' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND-1))
[ $# = 2 ] || { sed -n '2,/^set /{/^#/p}' "$0"; exit 2; }
ORIGIN="$1"; COW="$2"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/kmerge-finish.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
copy() {  # SRC DST
    case "$1" in *.gz) gzip -dc "$1" > "$2" ;; *) cp --sparse=always "$1" "$2" ;; esac
}
if [ $INPLACE = 1 ]; then
    case "$ORIGIN$COW" in *.gz*) echo "-i needs raw images" >&2; exit 2 ;; esac
    O="$ORIGIN"; C="$COW"
else
    [ -n "$OUTDIR" ] && { mkdir -p "$OUTDIR"; W="$OUTDIR"; } || W="$TMP"
    O="$W/origin.img"; C="$W/cow.img"
    copy "$ORIGIN" "$O" && copy "$COW" "$C" || exit 2
fi
if [ -z "$CHUNK" ]; then
    CHUNK=$(python3 -c 'import struct,sys; d=open(sys.argv[1],"rb").read(16); m,v,ver,c=struct.unpack("<IIII",d); print(c if m==0x70416e53 and c else 8)' "$C")
fi
G="$TMP/guest"; [ -n "$OUTDIR" ] && G="$OUTDIR/guest"
"$RIG/check-cow.sh" -M -w -c "$CHUNK" -o "$G" "$O" "$C" > "$TMP/log" 2>&1
rc=$?
cat "$TMP/log"
echo "sha256_merged_origin: $(sed -n 's/^sha256_merged_origin: //p' "$TMP/log")"
echo "status: $(sed -n 's/^status: //p' "$TMP/log")"
echo "exit_code: $rc"
exit $rc
