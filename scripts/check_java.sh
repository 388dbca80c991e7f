#!/usr/bin/env bash
# Spark 4 needs Java 17 or newer; say so plainly instead of failing deep inside py4j.
set -euo pipefail
if ! command -v java >/dev/null 2>&1; then
  echo "ERROR: Java 17+ is required (Spark 4) but 'java' is not on PATH." >&2
  echo "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless" >&2
  echo "  macOS:         brew install openjdk@17" >&2
  exit 1
fi
version=$(java -version 2>&1 | awk -F'"' '/version/ {print $2}')
major=${version%%.*}
if [ "${major:-0}" -lt 17 ] 2>/dev/null; then
  echo "ERROR: Java 17+ is required (Spark 4); found Java ${version}." >&2
  echo "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless (then select it with update-alternatives)" >&2
  exit 1
fi
