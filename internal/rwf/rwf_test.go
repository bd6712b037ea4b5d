package rwf

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// Every kernel lvnbd runs on takes RWF_DSYNC, on an empty file and at the end
// of a non-empty one, and no kernel takes a flag it does not know.
func TestSupported(t *testing.T) {
	for _, size := range []int64{0, 1 << 20} {
		path := filepath.Join(t.TempDir(), "f")
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		fd := int(f.Fd())
		if !Supported(fd, size, unix.RWF_DSYNC) {
			t.Errorf("size %d: RWF_DSYNC not supported", size)
		}
		const unknown = 1 << 30
		if Supported(fd, size, unknown) {
			t.Errorf("size %d: the kernel took the unknown flag %#x", size, unknown)
		}
	}
}
