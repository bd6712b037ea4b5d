package atomicfile

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
)

// ErrCorrupt means a file holds no JSON that decodes into the value asked
// for.
var ErrCorrupt = errors.New("corrupt")

// ReadJSON decodes the JSON file at path into v. A missing file leaves v as
// it is; one that does not decode is an error wrapping ErrCorrupt.
func ReadJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return nil
}

// WriteJSON replaces path with v as indented JSON, mode 0600, as Write
// does. The directory must exist.
func WriteJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return Write(path, append(b, '\n'), 0o600)
}
