#!/usr/bin/env bash
# Fails loudly (never skips) when the Google Cloud emulators the tests and the demo
# need are missing, and says how to install them.
set -u
missing=()
command -v gcloud >/dev/null 2>&1 || missing+=("gcloud (google-cloud-cli)")
command -v java >/dev/null 2>&1 || missing+=("java (a JRE, for the Pub/Sub emulator)")
if command -v gcloud >/dev/null 2>&1; then
  root=$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null)
  [ -x "$root/platform/bigtable-emulator/cbtemulator" ] || missing+=("google-cloud-cli-bigtable-emulator")
  [ -d "$root/platform/pubsub-emulator" ] || missing+=("google-cloud-cli-pubsub-emulator")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "Missing: ${missing[*]}" >&2
  echo "Install (Debian/Ubuntu, Google's apt repository):" >&2
  echo "  apt-get install google-cloud-cli google-cloud-cli-bigtable-emulator google-cloud-cli-pubsub-emulator default-jre-headless" >&2
  exit 1
fi
