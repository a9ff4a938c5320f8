package textutil;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.Reader;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.logging.Level;
import java.util.logging.Logger;

/**
 * A small CSV reader: a header line, then one record per line; fields may be quoted with double
 * quotes (a doubled quote inside a quoted field is a literal quote). Blank lines and lines starting
 * with {@code #} are skipped; a row with the wrong number of fields is logged and skipped.
 *
 * <p>This library is the only part of the multijar sample that uses java.logging, so the module
 * shows up only when jdeps analyses the class-path jars as well as the app jar.
 */
public final class Csv {
    private static final Logger LOG = Logger.getLogger(Csv.class.getName());

    private Csv() {
    }

    /** Reads all records, each a map from header name to field, in file order. */
    public static List<Map<String, String>> read(Reader source) throws IOException {
        BufferedReader in = new BufferedReader(source);
        List<String> header = null;
        List<Map<String, String>> rows = new ArrayList<>();
        String line;
        int number = 0;
        while ((line = in.readLine()) != null) {
            number++;
            if (line.isBlank() || line.startsWith("#")) {
                continue;
            }
            List<String> fields = split(line);
            if (header == null) {
                header = fields;
                continue;
            }
            if (fields.size() != header.size()) {
                LOG.log(Level.WARNING, "line {0}: expected {1} fields, found {2}; skipped",
                        new Object[] {number, header.size(), fields.size()});
                continue;
            }
            Map<String, String> row = new LinkedHashMap<>();
            for (int i = 0; i < header.size(); i++) {
                row.put(header.get(i), fields.get(i));
            }
            rows.add(Collections.unmodifiableMap(row));
        }
        LOG.fine(() -> "read " + rows.size() + " records");
        return Collections.unmodifiableList(rows);
    }

    /** Splits one CSV line into its fields. */
    public static List<String> split(String line) {
        List<String> fields = new ArrayList<>();
        StringBuilder field = new StringBuilder();
        boolean quoted = false;
        for (int i = 0; i < line.length(); i++) {
            char c = line.charAt(i);
            if (quoted) {
                if (c == '"' && i + 1 < line.length() && line.charAt(i + 1) == '"') {
                    field.append('"');
                    i++;
                } else if (c == '"') {
                    quoted = false;
                } else {
                    field.append(c);
                }
            } else if (c == '"') {
                quoted = true;
            } else if (c == ',') {
                fields.add(field.toString().trim());
                field.setLength(0);
            } else {
                field.append(c);
            }
        }
        fields.add(field.toString().trim());
        return fields;
    }
}
