# Kiln — the two commands first: `make demo` and `make test`.
GO       ?= go
BIN      ?= bin/kiln
GOBIN    ?= $(shell $(GO) env GOPATH)/bin
BENCHTIME ?= 1x
SOAKCOUNT ?= 5
SUDO     ?= $(shell test "$$(id -u)" = 0 || echo sudo)

.PHONY: all build test demo proto bench soak deps vet clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/kiln

# deps installs what the tests need on a fresh Debian machine with Go.
deps:
	$(GO) mod download
	@if ! command -v nix-build >/dev/null || ! test -x /bin/busybox; then \
		echo "installing Nix and busybox (Debian's nix-bin, busybox-static)"; \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y nix-bin busybox-static; \
	fi

vet:
	$(GO) vet ./...

test: deps vet
	$(GO) test -count=1 -timeout 15m ./...
	$(GO) test -race -count=1 -timeout 10m ./raftfsm ./coordinator ./cache ./agent ./gossip ./rpc ./web/...

demo: build deps
	BIN=./$(BIN) sh examples/demo.sh

# proto regenerates the committed Connect/protobuf code (the build needs no buf).
proto:
	@command -v $(GOBIN)/buf >/dev/null || $(GO) install github.com/bufbuild/buf/cmd/buf@v1.75.0
	@command -v $(GOBIN)/protoc-gen-go >/dev/null || $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
	@command -v $(GOBIN)/protoc-gen-connect-go >/dev/null || $(GO) install connectrpc.com/connect/cmd/protoc-gen-connect-go@v1.21.1
	PATH=$(GOBIN):$$PATH buf generate

# bench runs the benchmarks the issues ask for; figures go in the notes.
bench: bench-cache
	$(GO) test -run '^$$' -bench . -benchtime $(BENCHTIME) -timeout 60m ./raftfsm ./coordinator
	@echo "BenchmarkNarIngest again, against three real kiln coordinator processes:"
	$(GO) test -run '^$$' -bench NarIngestProcesses -benchtime $(BENCHTIME) -timeout 10m ./e2e
	@echo "BenchmarkState1M again, under a 1 GiB soft memory limit (what --memory-limit 1GiB sets):"
	GOMEMLIMIT=1GiB $(GO) test -run '^$$' -bench State1M -benchtime $(BENCHTIME) -timeout 20m ./raftfsm

# bench-cache compares the /cache/ server with nginx serving the same paths
# as a static cache, load from wrk (BENCH_DURATION=5s per run, BENCH_REPS=3,
# BENCH_PIN=same|split|none: CPU placement of the c=1 runs; see bench/cachebench).
.PHONY: bench-cache
# soak runs the cluster tests (in-process and real processes) again and
# again, with the race detector on the in-process ones, to shake out rare
# failures and hangs; -timeout makes a hang fail with every goroutine's stack.
soak: deps
	$(GO) test -race -count=$(SOAKCOUNT) -timeout 60m ./raftfsm ./coordinator
	$(GO) test -count=$(SOAKCOUNT) -timeout 60m ./e2e

bench-cache: deps
	@if ! command -v wrk >/dev/null || ! command -v zstd >/dev/null || ! { command -v nginx >/dev/null || test -x /usr/sbin/nginx; }; then \
		echo "installing wrk, zstd and nginx (Debian's wrk, zstd, nginx-light)"; \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y wrk zstd nginx-light; \
	fi
	GO=$(GO) $(GO) run ./bench/cachebench

clean:
	rm -rf bin
