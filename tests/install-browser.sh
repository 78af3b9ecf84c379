#!/usr/bin/env bash
# The browser test's one system package: Debian's chromium (Playwright drives it; it downloads no browser).
# Installed when missing and this is root with apt-get; otherwise say so loudly: the test then skips
# with the same reason in pytest's summary, it never passes without a browser.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "${CXR_CHROMIUM:-}" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "tests: installing chromium for the browser test (apt-get)" >&2
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/tmp/cxr-chromium-install.log 2>&1; then
    exit 0
  fi
  echo "tests: WARNING: chromium could not be installed (see /tmp/cxr-chromium-install.log); the browser test will be SKIPPED" >&2
else
  echo "tests: WARNING: no chromium and no root apt-get to install it; the browser test will be SKIPPED" >&2
fi
exit 0
