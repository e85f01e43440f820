package diskserve

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
)

// ErrOutsideConfinement is the error of a backing file or component that
// resolves outside the directory a [Confine] policy allows.
var ErrOutsideConfinement = errors.New("outside the confinement directory")

// Confine returns an [Options.ResolvePath] policy that resolves names as
// [ResolveRelative] does and refuses any whose real path, after every
// symbolic link is followed, lies outside dir: absolute names elsewhere,
// "../" escapes and links that lead out all fail with an error wrapping
// [ErrOutsideConfinement]. The path it returns is the real one, so a link
// swapped after the check is not followed. The image named to [Open] is
// not confined: only the names images record. URLs that images record are
// refused unless they start with one of allowURLs, at a boundary: an
// allowed "https://host/golden/" or "https://host/golden" admits
// "https://host/golden/a.qcow2", never "https://host/goldenrod".
func Confine(dir string, allowURLs ...string) (func(referrer, name string) (string, error), error) {
	root, err := filepath.Abs(dir)
	if err == nil {
		root, err = filepath.EvalSymlinks(root)
	}
	if err != nil {
		return nil, fmt.Errorf("confinement directory: %w", err)
	}
	return func(referrer, name string) (string, error) {
		path, err := ResolveRelative(referrer, name)
		if err != nil {
			return "", err
		}
		if isURL(path) {
			// An untrusted image must not make the server fetch URLs
			// of its choosing (inside the server's network, say).
			for _, prefix := range allowURLs {
				if urlUnder(path, prefix) {
					return path, nil
				}
			}
			return "", fmt.Errorf("%s is a URL that no --allow-url admits: %w %s", DisplayName(path), ErrOutsideConfinement, root)
		}
		if path, err = filepath.Abs(path); err != nil {
			return "", err
		}
		real, err := filepath.EvalSymlinks(path)
		if errors.Is(err, fs.ErrNotExist) {
			// Nothing to open; the open reports it. The lexical path
			// must still stay inside.
			real = path
		} else if err != nil {
			return "", err
		}
		rel, err := filepath.Rel(root, real)
		if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			return "", fmt.Errorf("%q resolves to %s, %w %s", name, real, ErrOutsideConfinement, root)
		}
		return real, nil
	}, nil
}

// urlUnder reports whether u is prefix or lies under it: prefix ends in
// '/', or u goes on with '/', '?' or '#' after it. A ".." segment after
// the prefix (which a server might resolve to outside it) is refused.
func urlUnder(u, prefix string) bool {
	rest, ok := strings.CutPrefix(u, prefix)
	if !ok || prefix == "" {
		return false
	}
	if path, _, _ := strings.Cut(rest, "?"); strings.Contains("/"+path+"/", "/../") {
		return false
	}
	return rest == "" || strings.HasSuffix(prefix, "/") || strings.ContainsAny(rest[:1], "/?#")
}
