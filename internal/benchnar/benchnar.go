// Package benchnar makes the NAR the ingest benchmarks upload and times the zstd CLI on it.
package benchnar

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os/exec"
	"time"

	"github.com/nix-community/go-nix/pkg/nar"
)

// NAR is a NAR of one file of size bytes (a multiple of 4 KiB), in 4 KiB
// runs alternately random and repetitive: it compresses like a typical
// output. The same size gives the same bytes.
func NAR(size int) ([]byte, error) {
	if size <= 0 || size%4096 != 0 {
		return nil, fmt.Errorf("benchnar: size %d is not a positive multiple of 4096", size)
	}
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	run := bytes.Repeat([]byte("kiln nar ingest "), 256)
	for i := 0; i < size; i += 4096 {
		if (i/4096)%2 == 0 {
			for j := i; j < i+4096; j += 8 {
				v := rng.Uint64()
				for k := 0; k < 8; k++ {
					data[j+k] = byte(v >> (8 * k))
				}
			}
		} else {
			copy(data[i:i+4096], run)
		}
	}
	var b bytes.Buffer
	nw, err := nar.NewWriter(&b)
	if err != nil {
		return nil, err
	}
	if err := nw.WriteHeader(&nar.Header{Path: "/", Type: nar.TypeRegular, Size: int64(size)}); err != nil {
		return nil, err
	}
	if _, err := nw.Write(data); err != nil {
		return nil, err
	}
	if err := nw.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// ZstdCLI is how long `zstd -3 -T2` takes to compress file to nowhere:
// the baseline the ingest benchmarks report their ratio against.
func ZstdCLI(file string) (time.Duration, error) {
	t0 := time.Now()
	cmd := exec.Command("zstd", "-3", "-T2", "-q", "-c", file)
	cmd.Stdout = io.Discard
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("zstd -3 -T2 %s: %w", file, err)
	}
	return time.Since(t0), nil
}
