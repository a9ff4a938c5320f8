package io.jvmkit.samples.shortener;

import java.net.URI;
import java.net.URISyntaxException;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.concurrent.atomic.AtomicLong;

/**
 * The shortener's state: short codes to target URLs, with a hit counter per link. Thread-safe.
 *
 * <p>Codes are base-62 renderings of a counter, so they are short, unique and stable for a given
 * order of requests (no randomness: the same requests give the same codes).
 */
final class LinkStore {
    private static final String ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    static final int MAX_URL_LENGTH = 2048;

    /** One stored link. */
    record Link(String code, String url, long hits) {
    }

    private final Map<String, String> urls = new LinkedHashMap<>();
    private final Map<String, String> codeByUrl = new LinkedHashMap<>();
    private final Map<String, AtomicLong> hits = new LinkedHashMap<>();
    private final int capacity;
    private long next = 1;

    LinkStore(int capacity) {
        this.capacity = capacity;
    }

    /** Checks that {@code url} is an absolute http(s) URL; returns the problem, or null if fine. */
    static String problemWith(String url) {
        if (url.isEmpty()) {
            return "empty URL";
        }
        if (url.length() > MAX_URL_LENGTH) {
            return "URL longer than " + MAX_URL_LENGTH + " characters";
        }
        try {
            URI uri = new URI(url);
            String scheme = uri.getScheme();
            if (scheme == null || !(scheme.equalsIgnoreCase("http") || scheme.equalsIgnoreCase("https"))) {
                return "only http and https URLs can be shortened";
            }
            if (uri.getHost() == null) {
                return "URL has no host";
            }
        } catch (URISyntaxException e) {
            return "not a URL: " + e.getReason();
        }
        return null;
    }

    /** Store {@code url} (already checked) and return its link; the same URL keeps its code. */
    synchronized Optional<Link> shorten(String url) {
        String existing = codeByUrl.get(url);
        if (existing != null) {
            return Optional.of(new Link(existing, url, hits.get(existing).get()));
        }
        if (urls.size() >= capacity) {
            return Optional.empty();
        }
        String code = encode(next++);
        urls.put(code, url);
        codeByUrl.put(url, code);
        hits.put(code, new AtomicLong());
        return Optional.of(new Link(code, url, 0));
    }

    /** The target of {@code code}, counting the hit. */
    synchronized Optional<String> follow(String code) {
        String url = urls.get(code);
        if (url != null) {
            hits.get(code).incrementAndGet();
        }
        return Optional.ofNullable(url);
    }

    synchronized Optional<Link> get(String code) {
        String url = urls.get(code);
        return url == null ? Optional.empty() : Optional.of(new Link(code, url, hits.get(code).get()));
    }

    synchronized boolean delete(String code) {
        String url = urls.remove(code);
        if (url == null) {
            return false;
        }
        codeByUrl.remove(url);
        hits.remove(code);
        return true;
    }

    synchronized List<Link> all() {
        List<Link> out = new ArrayList<>(urls.size());
        for (Map.Entry<String, String> e : urls.entrySet()) {
            out.add(new Link(e.getKey(), e.getValue(), hits.get(e.getKey()).get()));
        }
        return out;
    }

    synchronized int size() {
        return urls.size();
    }

    static String encode(long n) {
        StringBuilder sb = new StringBuilder();
        do {
            sb.append(ALPHABET.charAt((int) (n % ALPHABET.length())));
            n /= ALPHABET.length();
        } while (n > 0);
        return sb.reverse().toString();
    }

    static boolean isCode(String s) {
        if (s.isEmpty() || s.length() > 12) {
            return false;
        }
        for (int i = 0; i < s.length(); i++) {
            if (ALPHABET.indexOf(s.charAt(i)) < 0) {
                return false;
            }
        }
        return true;
    }
}
