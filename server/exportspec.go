package server

import (
	"fmt"
	"strings"

	"github.com/lvnbd/lvnbd/server/backend"
)

// ExportSpec is an export given on the command line as NAME=PATH[:ro].
type ExportSpec struct {
	Name     string
	Path     string
	ReadOnly bool
}

// ParseExportSpec parses NAME=PATH[:ro].
func ParseExportSpec(s string) (ExportSpec, error) {
	name, path, ok := strings.Cut(s, "=")
	if !ok || name == "" || path == "" {
		return ExportSpec{}, fmt.Errorf("export %q: want NAME=PATH or NAME=PATH:ro (e.g. vm1=/dev/vg0/vm1)", s)
	}
	if err := ValidateExportName(name); err != nil {
		return ExportSpec{}, err
	}
	spec := ExportSpec{Name: name, Path: path}
	if strings.HasSuffix(path, ":rw") {
		return ExportSpec{}, fmt.Errorf("export %q: only :ro may follow the path (read-write is the default): give NAME=PATH", s)
	}
	if p, found := strings.CutSuffix(path, ":ro"); found {
		spec.Path, spec.ReadOnly = p, true
	}
	if spec.Path == "" {
		return ExportSpec{}, fmt.Errorf("export %q: empty path", s)
	}
	return spec, nil
}

// ValidateExportName refuses names clients could not ask for or that would be
// confusing in URIs and logs.
func ValidateExportName(name string) error {
	if len(name) > 64 {
		return fmt.Errorf("export name %q is longer than 64 characters", name)
	}
	for _, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._-@", r)
		if !ok {
			return fmt.Errorf("export name %q: only letters, digits and . _ - @ are allowed", name)
		}
	}
	if strings.HasPrefix(name, "-") || strings.HasPrefix(name, ".") {
		return fmt.Errorf("export name %q must not start with - or .", name)
	}
	return nil
}

// OpenExport opens the file or block device of spec.
func OpenExport(spec ExportSpec) (*Export, error) {
	b, err := backend.Open(spec.Path, spec.ReadOnly)
	if err != nil {
		return nil, fmt.Errorf("export %q: %w", spec.Name, err)
	}
	return &Export{Name: spec.Name, Description: spec.Path, ReadOnly: spec.ReadOnly, Backend: b}, nil
}
