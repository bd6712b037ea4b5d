# lvnbd — `make run` serves the volumes in ./lvnbd-data and benchmarks them; `make test` runs
# every test. Both install what they need (scripts/deps.sh).
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin:/usr/sbin:/sbin
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
BIN := bin/lvnbd
FUZZTIME ?= 5s

PREFIX ?= /usr
DESTDIR ?=
DEBDIR ?= dist

.PHONY: all build deps deps-run deps-bench run test test-unit test-race test-interop test-vm test-packaging test-systemd fuzz bench vet clean install deb

all: build

deps:
	scripts/deps.sh all

deps-run:
	scripts/deps.sh run

deps-bench:
	scripts/deps.sh bench

# A static binary (CGO off) runs in the VM's initramfs and on any storage box.
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o $(BIN) ./cmd/lvnbd

run: deps-run build
	scripts/run.sh

vet:
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# Unit, table and fuzz-seed tests, with the race detector; the packages'
# own interop tests (the client against nbdkit, qemu-nbd, nbd-server) and
# the backend's tests on a loop device must run, not skip. The end-to-end
# suites under test/ have targets of their own.
test-unit:
	LVNBD_REQUIRE_INTEROP=1 LVNBD_REQUIRE_LOOP=1 CGO_ENABLED=1 $(GO) test -race -count=1 $$($(GO) list ./... | grep -v '/test/')

# Real clients and servers from Debian against ours.
test-interop: build
	LVNBD_INTEROP=1 LVNBD_REQUIRE_INTEROP=1 $(GO) test -count=1 -v ./test/interop/ 2>&1 | tee /tmp/lvnbd-interop.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)' ; test $${PIPESTATUS[0]} -eq 0

# The kernel path, on Debian's kernel under qemu (no KVM needed); a skipped
# scenario fails it.
test-vm: build
	test/vm/run.sh --lvnbd $(BIN) --no-skip

# Every fuzz target for FUZZTIME each, on top of the seeds `go test` runs.
fuzz:
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME)

# The binary, systemd units, /etc/default/lvnbd, example configurations in
# /etc/lvnbd (existing ones are kept), completions, man pages and README.
# `make install DESTDIR=/tmp/stage PREFIX=/usr/local` stages elsewhere.
install: build
	packaging/install.sh "$(DESTDIR)" "$(PREFIX)" $(BIN)

# dist/lvnbd_VERSION_ARCH.deb, its version from git describe.
deb: build
	packaging/deb.sh $(BIN) $(DEBDIR) $(VERSION)

# The units (systemd-analyze verify, offline), install.sh, the .deb's
# contents (dpkg-deb; lintian when installed) and the maintainer scripts.
test-packaging: build
	LVNBD_REQUIRE_PACKAGING=1 LVNBD_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 ./test/packaging/

# The .deb on a clean Debian booted with systemd as PID 1 (qemu, TCG): dpkg -i,
# lvnbd-server on the file driver through systemctl start, reload and stop,
# socket activation, dpkg --purge. It builds the package with make deb.
test-systemd:
	test/systemd/run.sh

# A benchmark, not a test: it reports and never fails on a number.
bench: deps-bench build
	scripts/bench.sh

test: deps vet build test-unit fuzz test-interop test-packaging test-systemd test-vm

clean:
	rm -rf bin dist
