-- tpm_window: shared by decide.lua and state.lua (prepended to each when loaded).
--
-- A TPM HASH holds one field per unix second (tokens charged in it) and two running
-- totals, kept by decide.lua and settle.lua: TPM_SUM, the tokens of every bucket in
-- the hash, and TPM_OLDEST, its oldest bucket's second; and TPM_EXPIRED, the second
-- decide.lua last set the hash's TTL. Their field names are seconds long gone ("0",
-- "1", "2"; every name up to TOTALS is one of them): whatever sums buckets (here,
-- settle.lua's stats) counts them as out of the window, and a script of an earlier
-- release deletes them as such (the totals are then missing, and decide.lua sums the
-- buckets again).
local TPM_SUM, TPM_OLDEST, TPM_EXPIRED, TOTALS = "0", "1", "2", 2
--
-- fields: HGETALL of a TPM HASH (second -> tokens); now_s: now, unix seconds.
-- on_stale(field), if given, is called for each second that left the 60 s window.
-- Returns the window's token sum, its live {second, tokens, ...} pairs, and its
-- oldest live second (-1 when the window is empty).
local function tpm_window(fields, now_s, on_stale)
  local sum = 0
  local live = {}
  local oldest = -1
  for i = 1, #fields, 2 do
    local second = tonumber(fields[i])
    if second > now_s - 60 then
      local n = tonumber(fields[i + 1])
      sum = sum + n
      live[#live + 1] = second
      live[#live + 1] = n
      if oldest < 0 or second < oldest then oldest = second end
    elseif on_stale then
      on_stale(fields[i])
    end
  end
  return sum, live, oldest
end

