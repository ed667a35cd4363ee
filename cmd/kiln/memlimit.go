package main

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
)

// The coordinator's memory is its state: with a million queued steps the
// live heap is about 450 MiB, and Go's collector (GOGC=100) lets the
// process grow to about twice its live heap before collecting. A soft
// memory limit makes the collector work harder near the limit instead.

// memoryLimit turns --memory-limit into bytes: "auto" is 90% of the
// cgroup's memory limit (none without one, or when GOMEMLIMIT is set:
// the runtime already applies it), "none" or "0" no limit, otherwise a
// size such as 900MiB, 2GiB, 1500MB or a number of bytes. ok is false
// when the runtime's setting is to be left alone.
func memoryLimit(spec string, cgroupRoot string, getenv func(string) string) (limit int64, ok bool, err error) {
	switch strings.ToLower(strings.TrimSpace(spec)) {
	case "auto", "":
		if getenv("GOMEMLIMIT") != "" {
			return 0, false, nil
		}
		n, found, err := cgroupMemoryLimit(cgroupRoot)
		if err != nil || !found {
			return 0, false, err
		}
		return n / 10 * 9, true, nil
	case "none", "0":
		return math.MaxInt64, true, nil
	}
	n, err := parseSize(spec)
	if err != nil {
		return 0, false, fmt.Errorf("--memory-limit %q: %w", spec, err)
	}
	return n, true, nil
}

var sizeUnits = []struct {
	suffix string
	mult   int64
}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1}}

// parseSize reads a positive byte size with an optional unit.
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range sizeUnits {
		if rest, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = strings.TrimSpace(rest), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 || n > math.MaxInt64/mult {
		return 0, errors.New("want a positive size such as 900MiB, 2GiB or a number of bytes")
	}
	return n * mult, nil
}

// cgroupMemoryLimit reads the memory limit of the process's cgroup under
// root (/sys/fs/cgroup): cgroup v2's memory.max, else v1's
// memory/memory.limit_in_bytes. found is false when there is none.
func cgroupMemoryLimit(root string) (int64, bool, error) {
	for _, name := range []string{"memory.max", filepath.Join("memory", "memory.limit_in_bytes")} {
		b, err := os.ReadFile(filepath.Join(root, name))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return 0, false, fmt.Errorf("cgroup memory limit: %w", err)
		}
		v := strings.TrimSpace(string(b))
		if v == "max" {
			return 0, false, nil
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			return 0, false, fmt.Errorf("cgroup memory limit: %s holds %q", name, v)
		}
		// cgroup v1 reports "no limit" as a huge page-rounded number.
		if n >= math.MaxInt64/2 {
			return 0, false, nil
		}
		return n, true, nil
	}
	return 0, false, nil
}

// applyMemoryLimit sets the runtime's soft memory limit from --memory-limit.
func applyMemoryLimit(spec string, log *slog.Logger) error {
	n, ok, err := memoryLimit(spec, "/sys/fs/cgroup", os.Getenv)
	if err != nil || !ok {
		return err
	}
	debug.SetMemoryLimit(n)
	if n == math.MaxInt64 {
		log.Info("no soft memory limit")
	} else {
		log.Info("soft memory limit set", "bytes", n, "MiB", n>>20)
	}
	return nil
}
