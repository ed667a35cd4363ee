package benchnar

import (
	"bytes"
	"io"
	"os"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nar"
)

func TestNAR(t *testing.T) {
	for _, tc := range []struct {
		size    int
		wantErr bool
	}{{4096, false}, {1 << 20, false}, {0, true}, {4095, true}, {-4096, true}} {
		b, err := NAR(tc.size)
		if (err != nil) != tc.wantErr {
			t.Fatalf("NAR(%d): err %v, want error %v", tc.size, err, tc.wantErr)
		}
		if err != nil {
			continue
		}
		again, _ := NAR(tc.size)
		if !bytes.Equal(b, again) {
			t.Errorf("NAR(%d) differs between calls", tc.size)
		}
		r, err := nar.NewReader(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		h, err := r.Next()
		if err != nil || h.Type != nar.TypeRegular || h.Size != int64(tc.size) {
			t.Fatalf("NAR(%d): first entry %+v, %v; want one regular file of that size", tc.size, h, err)
		}
		content, err := io.ReadAll(r)
		if err != nil || len(content) != tc.size {
			t.Fatalf("NAR(%d): read %d bytes, %v", tc.size, len(content), err)
		}
		if _, err := r.Next(); err != io.EOF {
			t.Errorf("NAR(%d): a second entry or a bad end: %v", tc.size, err)
		}
		// It compresses like an output: neither all random nor all runs.
		enc, _ := zstd.NewWriter(nil)
		ratio := float64(len(enc.EncodeAll(content, nil))) / float64(tc.size)
		if tc.size >= 1<<20 && (ratio < 0.4 || ratio > 0.6) {
			t.Errorf("NAR(%d) compresses to %.2f of its size, want about half", tc.size, ratio)
		}
	}
}

func TestProcCPU(t *testing.T) {
	// Burn CPU until /proc shows this process some ticks.
	var sum uint64
	deadline := time.Now().Add(10 * time.Second)
	for {
		for i := range 1 << 20 {
			sum += uint64(i) * 2654435761
		}
		d, err := procCPU(os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		if d > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no CPU time in /proc/self/stat after 10 s of work (%d)", sum)
		}
	}
	if _, err := procCPU(1 << 30); err == nil {
		t.Error("procCPU of a process that does not exist: no error")
	}
}
