package volume_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/lvnbd/lvnbd/volume"
	_ "github.com/lvnbd/lvnbd/volume/file"
)

func TestOpenUnknownScheme(t *testing.T) {
	for _, u := range []string{"s3://bucket", "/var/lib/lvnbd", "zfs://tank"} {
		_, err := volume.Open(u)
		if !errors.Is(err, volume.ErrUnsupported) {
			t.Errorf("Open(%q) error = %v, want ErrUnsupported", u, err)
			continue
		}
		if !strings.Contains(err.Error(), "file://") {
			t.Errorf("Open(%q) error %q does not say which schemes there are", u, err)
		}
	}
}

func TestOpenDefault(t *testing.T) {
	d, err := volume.Open("")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(d.String(), "file:///") || !strings.HasSuffix(d.String(), "/lvnbd-data") {
		t.Errorf("default driver is %s, want file:///…/lvnbd-data", d)
	}
}
